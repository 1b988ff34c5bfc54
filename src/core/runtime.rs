//! The live state of a running lb: the current [`Snapshot`] behind one
//! `ArcSwap`, and everything that must outlive a snapshot.
//!
//! A snapshot is built once per config change — validated config, backend
//! list joined with its runtime state, the strategy's selector, the upstream
//! client and the server settings — and a request loads it once, so every
//! decision of that request sees one consistent config. Swapping in the next
//! snapshot is one atomic store; requests already running finish on the one
//! they loaded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;

use crate::config::backend_tls::BackendTls;
use crate::config::{
    Config, ConfigDiff, ContentHash, ListenerName, Mode, PoolConfig, PoolName, Protocol,
};
use crate::core::affinity::AffinityCookies;
use crate::core::budget::RetryBudget;
use crate::core::conns::ConnectionCount;
use crate::core::conns::{Grace, Upgrades};
use crate::core::route::{Route, Router};
use crate::core::selection::{self, Backend, Pick, Selector, Steer};
use crate::core::state::{Clock, StateTable};
use crate::obs::access_log::AccessLog;
use crate::obs::metrics::Metrics;
use crate::tls::client::{ClientFiles, ClientTls};

/// Everything a request needs, built from one config.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated config this snapshot was built from.
    pub config: Config,
    /// Hash of the file this config came from, for logs.
    pub hash: ContentHash,
    /// The pools, in the config's order (`config.pools[i]` is `pools[i]`).
    pub pools: Vec<Pool>,
    /// Per listener, in the config's order: (Host, path) → pool (a tcp
    /// listener's by SNI), built once per config.
    pub listeners: Vec<ListenerRoutes>,
    /// The largest `retry.buffer_body_limit` of any pool: what the fast
    /// path may read before it knows the request's pool.
    pub max_buffer_body_limit: u64,
}

/// What one listener's requests (or connections) are routed by.
#[derive(Debug)]
pub struct ListenerRoutes {
    pub name: ListenerName,
    pub router: Router<RouteTarget>,
    /// Every request is answered with a 308 to this HTTPS port.
    pub redirect_https: Option<u16>,
}

/// What a route sends to: a pool, and whether its prefix is removed.
#[derive(Debug, Clone, Copy)]
pub struct RouteTarget {
    /// Index into [`Snapshot::pools`].
    pub pool: usize,
    pub strip_prefix: bool,
}

/// A request's route: its pool and the path to send upstream when the
/// route strips its prefix.
#[derive(Debug)]
pub struct Routed<'a> {
    /// Index of `pool` in the snapshot.
    pub index: usize,
    pub pool: &'a Pool,
    /// `Some` when the route strips a prefix: the rewritten path and query.
    pub rewritten: Option<std::borrow::Cow<'a, str>>,
}

impl Snapshot {
    /// The routes of the listener named `listener`; `None` once a reload
    /// removed it (its connections still open get 404s).
    pub fn listener(&self, listener: &str) -> Option<&ListenerRoutes> {
        // A handful at most: a scan of short names beats hashing.
        self.listeners.iter().find(|l| l.name.as_str() == listener)
    }

    /// The pool that serves a request on `listener` for `host` (Host
    /// header or `:authority`, as sent; a tcp listener's SNI) and
    /// `path_and_query`; `None` when no route matches (the client gets 404).
    pub fn route<'a>(
        &'a self,
        listener: &str,
        host: Option<&str>,
        path_and_query: &'a str,
    ) -> Option<Routed<'a>> {
        let found = self.listener(listener)?.router.find(host, path_and_query)?;
        let target = found.route.target;
        let rewritten = target
            .strip_prefix
            .then(|| crate::core::route::strip_prefix(&found.route.path_prefix, path_and_query));
        Some(Routed {
            index: target.pool,
            pool: &self.pools[target.pool],
            rewritten,
        })
    }

    /// The pool `mode: tcp` serves, and a single-pool file's only pool.
    pub fn first_pool(&self) -> &Pool {
        // A config has at least one pool (validate).
        &self.pools[0]
    }

    /// Every backend of every pool.
    pub fn all_backends(&self) -> impl Iterator<Item = &Backend> {
        self.pools.iter().flat_map(|p| p.backends.iter())
    }
}

/// One pool as a request sees it: its members joined with their runtime
/// state, the strategy built over them, its cookies and its retry budget.
#[derive(Debug)]
pub struct Pool {
    /// This pool's settings (strategy, retry, health, steering).
    pub config: Arc<PoolConfig>,
    /// The members in config order, each with its runtime state.
    pub backends: Vec<Backend>,
    /// The configured strategy, built over `backends`; shared with the
    /// previous snapshot when neither the members nor the strategy changed.
    pub selector: Arc<dyn Selector>,
    /// Cookie tokens per backend when `session_affinity` is on.
    pub affinity: Option<AffinityCookies>,
    /// What outlives snapshots with the pool's name: its retry budget and
    /// the counts of lb's own answers for it.
    pub shared: Arc<PoolShared>,
    /// HTTPS to the backends (`tls:`, `protocol: h2`/`auto`): kept from the
    /// previous snapshot while the settings stay, so each worker keeps its
    /// warm connections (a client is kept per `ClientTls`).
    pub tls: Option<Arc<ClientTls>>,
}

/// Per-pool state that survives reloads (kept by pool name, as backend
/// state is kept by pool and address).
#[derive(Debug)]
pub struct PoolShared {
    /// Retry tokens of this pool (Envoy keeps one per cluster).
    pub budget: RetryBudget,
    /// Requests routed here that lb answered itself (no backend available,
    /// every attempt failed), by status.
    pub own_answers: crate::obs::metrics::StatusCounts,
    /// gRPC calls routed here, by the `grpc-status` their client got.
    pub grpc: crate::obs::metrics::GrpcCounts,
    /// Why the pool is dead, while health checks hold every backend down
    /// (`all 3 backends fail GET /health (404 Not Found): …`); written by
    /// the health checker, read by the 503 answer and `/status`.
    pub down: ArcSwapOption<String>,
}

impl Pool {
    pub fn name(&self) -> &PoolName {
        &self.config.name
    }

    /// The backend picked for an attempt, skipping those `eligible` rejects.
    pub fn select(&self, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        self.select_for(&Steer::default(), eligible)
    }

    /// As [`Pool::select`], for a request with a hash key or an affinity
    /// cookie: the pinned backend while it is eligible, else the strategy.
    pub fn select_for(&self, steer: &Steer, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        if self.backends.is_empty() {
            // A discovered pool whose name has no address (yet).
            return None;
        }
        if let Some(i) = steer.pinned.filter(|&i| eligible(i)) {
            return Some(i);
        }
        let pick = Pick {
            key: steer.key,
            eligible,
        };
        self.selector.select(&self.backends, &pick)
    }
}

thread_local! {
    /// This thread's handle on the snapshot it last served with (see
    /// [`Runtime::worker_snapshot`]).
    static WORKER_SNAPSHOT: std::cell::RefCell<Option<Arc<WorkerSnapshot>>> =
        const { std::cell::RefCell::new(None) };
}

/// A worker thread's own handle on a snapshot (see
/// [`Runtime::worker_snapshot`]): its count is touched by that thread only.
#[derive(Debug)]
pub struct WorkerSnapshot(Arc<Snapshot>);

impl std::ops::Deref for WorkerSnapshot {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.0
    }
}

/// Drops this thread's cached snapshot handle, so a worker that serves no
/// request after a reload does not keep the old snapshot alive.
pub fn forget_worker_snapshot() {
    WORKER_SNAPSHOT.with_borrow_mut(Option::take);
}

/// Reload counters and the last result, for logs, `/metrics` and `/status`.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Configs applied, the first one included.
    pub applied: AtomicU64,
    /// Reloads refused (bad file, failed bind); the old config kept serving.
    pub rejected: AtomicU64,
    /// Times the reloader read the config file: shows that events for other
    /// files in its directory (a log file) cost no reads.
    pub reads: AtomicU64,
    /// The last result (applied or rejected). Written by the reloader, read
    /// by the admin listener: never on the request path.
    last: Mutex<LastReload>,
}

/// What the last reload (or the initial load) did.
#[derive(Debug, Clone)]
pub struct LastReload {
    /// Bumped on every result, so a caller can tell whether a reload it
    /// asked for produced one.
    pub seq: u64,
    /// Applied (true) or rejected.
    pub ok: bool,
    /// When it happened.
    pub at: SystemTime,
    /// When a config was last applied (`loaded_at`).
    pub applied_at: SystemTime,
    /// Why it was rejected; the message names file, line and column when
    /// the file was at fault.
    pub error: Option<String>,
}

impl Default for LastReload {
    fn default() -> Self {
        let now = SystemTime::now();
        LastReload {
            seq: 0,
            ok: true,
            at: now,
            applied_at: now,
            error: None,
        }
    }
}

impl ReloadStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, LastReload> {
        self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the last result.
    pub fn last(&self) -> LastReload {
        self.lock().clone()
    }

    /// When the config in use was applied.
    pub fn last_applied_at(&self) -> SystemTime {
        self.lock().applied_at
    }

    fn record_applied(&self) {
        self.applied.fetch_add(1, Relaxed);
        let mut last = self.lock();
        let now = SystemTime::now();
        *last = LastReload {
            seq: last.seq + 1,
            ok: true,
            at: now,
            applied_at: now,
            error: None,
        };
    }

    /// Counts a refused reload and keeps its error for `/status`.
    pub fn record_rejected(&self, error: String) {
        self.rejected.fetch_add(1, Relaxed);
        let mut last = self.lock();
        *last = LastReload {
            seq: last.seq + 1,
            ok: false,
            at: SystemTime::now(),
            applied_at: last.applied_at,
            error: Some(error),
        };
    }

    /// The file is back to the config in use: after a rejected edit this
    /// clears the failure (nothing else changes).
    pub fn record_unchanged(&self) {
        let mut last = self.lock();
        if !last.ok {
            *last = LastReload {
                seq: last.seq + 1,
                ok: true,
                at: SystemTime::now(),
                applied_at: last.applied_at,
                error: None,
            };
        }
    }

    /// The result recorded after `seq`, or `None` if there was none (the
    /// file was unchanged).
    pub fn since(&self, seq: u64) -> Option<LastReload> {
        let last = self.lock();
        (last.seq > seq).then(|| last.clone())
    }
}

/// State shared by the proxy, the health checker and the reloader.
#[derive(Debug)]
pub struct Runtime {
    current: ArcSwap<Snapshot>,
    /// Per-backend state by address; survives every reload.
    states: StateTable,
    /// Time base for ejections, on tokio's clock.
    pub clock: Clock,
    /// Retry tokens per pool; the budget's parameters come from each
    /// request's snapshot.
    pools: Mutex<HashMap<PoolName, Arc<PoolShared>>>,
    pub reloads: ReloadStats,
    /// Open client connections, against `limits.max_connections`.
    pub connections: Arc<ConnectionCount>,
    /// Counters not tied to one backend (those are in each `BackendState`).
    pub metrics: Metrics,
    /// lb's own resource shortages, counted and logged rate-limited.
    pub local_errors: crate::obs::local::LocalErrors,
    /// TLS termination's certificates and counters, when `tls:` is set.
    pub tls: crate::obs::tls::TlsStatus,
    /// The access log's writer, off the request path.
    pub access_log: AccessLog,
    /// lb's own log lines dropped because stderr fell behind (set once at
    /// start when `main` set up the log).
    pub log_lines_dropped: std::sync::OnceLock<crate::obs::logging::DroppedLines>,
    /// Upgraded connections being relayed; closed at the end of shutdown.
    pub upgrades: Upgrades,
    /// Shutdown's grace period: when it runs out, upgraded connections
    /// close and response bodies still waiting on their backend end.
    pub grace: Grace,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    pub shutting_down: AtomicBool,
    /// Bumped on every applied config; the health checker waits on it.
    generation: watch::Sender<u64>,
    /// What DNS found for each discovered pool (outlives reloads).
    pub discovered: crate::core::discovered::Discovered,
    /// Held while a snapshot is built and swapped in: a reload and a
    /// discovered change are applied one after the other, never over each
    /// other. Never taken on the request path.
    applying: Mutex<()>,
}

impl Runtime {
    /// The runtime of an lb serving `config`.
    pub fn new(config: Config, hash: ContentHash) -> Arc<Runtime> {
        let clock = Clock::new();
        let states = StateTable::new(clock);
        let pools = Mutex::default();
        let snapshot = build(config, hash, &states, &pools, None);
        let runtime = Runtime {
            current: ArcSwap::from_pointee(snapshot),
            states,
            pools,
            clock,
            reloads: ReloadStats::default(),
            connections: Arc::default(),
            metrics: Metrics::default(),
            local_errors: crate::obs::local::LocalErrors::default(),
            tls: Default::default(),
            access_log: AccessLog::default(),
            log_lines_dropped: std::sync::OnceLock::new(),
            upgrades: Upgrades::default(),
            grace: Grace::default(),
            shutting_down: AtomicBool::new(false),
            generation: watch::channel(0).0,
            discovered: Default::default(),
            applying: Mutex::new(()),
        };
        runtime.reloads.record_applied();
        Arc::new(runtime)
    }

    /// The current snapshot; hold it for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The current snapshot through this thread's own `Arc`, for the
    /// per-request path of a worker: every worker cloning the one shared
    /// `Arc` would bounce its count's cache line between cores on each
    /// request. The thread keeps its handle until the snapshot changes or
    /// [`forget_worker_snapshot`] (each worker's tick) drops it, so an old
    /// snapshot outlives a reload by at most a tick on an idle worker.
    pub fn worker_snapshot(&self) -> Arc<WorkerSnapshot> {
        let current = self.current.load();
        WORKER_SNAPSHOT.with_borrow_mut(|cached| match cached {
            Some(c) if Arc::ptr_eq(&c.0, &current) => Arc::clone(c),
            _ => {
                let fresh = Arc::new(WorkerSnapshot(arc_swap::Guard::into_inner(current)));
                *cached = Some(Arc::clone(&fresh));
                fresh
            }
        })
    }

    /// Builds a snapshot of `config` and swaps it in. Backends whose address
    /// stays keep their state; the diff says what changed.
    pub fn apply(&self, config: Config, hash: ContentHash) -> ConfigDiff {
        let _applying = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
        self.discovered.retain(&config);
        let config = self.discovered.fill(config);
        let old = self.current.load_full();
        let next = build(config, hash, &self.states, &self.pools, Some(&old));
        let summary = ConfigDiff::between(&old.config, &next.config);
        self.current.store(Arc::new(next));
        self.reloads.record_applied();
        self.generation.send_modify(|g| *g += 1);
        summary
    }

    /// `backends` are what `pool`'s name resolves to now: applied when they
    /// differ from what it had and the running config still discovers the
    /// pool this way. Returns what changed, or `None`. Not a reload: the
    /// config is the same; its discovered members changed.
    pub fn rediscovered(
        &self,
        pool: &PoolName,
        discovery: &crate::config::discovery::Discovery,
        backends: Vec<crate::config::BackendConfig>,
    ) -> Option<crate::config::ListDiff> {
        let _applying = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.discovered.store(pool, discovery, backends) {
            return None;
        }
        let old = self.current.load_full();
        if old.config.pool(pool.as_str())?.discovery.as_ref() != Some(discovery) {
            return None;
        }
        let config = self.discovered.fill(old.config.clone());
        let next = build(config, old.hash, &self.states, &self.pools, Some(&old));
        let diff = ConfigDiff::between(&old.config, &next.config);
        self.current.store(Arc::new(next));
        self.generation.send_modify(|g| *g += 1);
        Some(diff.backends)
    }

    /// A receiver that wakes on every applied config.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

fn build(
    config: Config,
    hash: ContentHash,
    states: &StateTable,
    shared: &Mutex<HashMap<PoolName, Arc<PoolShared>>>,
    old: Option<&Snapshot>,
) -> Snapshot {
    let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
    shared.retain(|name, _| config.pool(name.as_str()).is_some());
    // A discovered pool that had no member (its name did not resolve yet,
    // or had no address): what joins it is its first set, unramped as the
    // startup config's backends are.
    let first_set = |name: &PoolName| {
        config
            .pool(name.as_str())
            .is_some_and(|p| p.discovery.is_some())
            && old.is_none_or(|o| {
                o.pools
                    .iter()
                    .find(|p| p.name() == name)
                    .is_none_or(|p| p.backends.is_empty())
            })
    };
    let pools = config
        .pools
        .iter()
        .zip(states.sync(&config, &first_set))
        .map(|(pool_config, states_of_pool)| {
            let old_pool = old.and_then(|o| o.pools.iter().find(|p| p.name() == &pool_config.name));
            let pool_shared =
                Arc::clone(shared.entry(pool_config.name.clone()).or_insert_with(|| {
                    Arc::new(PoolShared {
                        budget: RetryBudget::new(states.clock()),
                        own_answers: Default::default(),
                        grpc: Default::default(),
                        down: ArcSwapOption::empty(),
                    })
                }));
            build_pool(
                Arc::clone(pool_config),
                states_of_pool,
                old_pool,
                pool_shared,
                states.clock(),
            )
        })
        .collect();
    let to_route = |r: &crate::config::RouteConfig| Route {
        host: r.host.clone(),
        path_prefix: r.path_prefix.as_str().into(),
        target: RouteTarget {
            pool: r.pool,
            strip_prefix: r.strip_prefix,
        },
    };
    let listeners = config
        .listeners
        .iter()
        .map(|l| ListenerRoutes {
            name: l.name.clone(),
            router: Router::new(match l.mode {
                Mode::Tcp => l.routes.iter().map(to_route).collect(),
                // Redirected, every request: no pool serves there.
                _ if l.redirect_https.is_some() => Vec::new(),
                _ => config
                    .routes
                    .iter()
                    .filter(|r| r.applies_on(&l.name))
                    .map(to_route)
                    .collect(),
            }),
            redirect_https: l.redirect_https,
        })
        .collect();
    let max_buffer_body_limit = config
        .pools
        .iter()
        .map(|p| p.retry.buffer_body_limit)
        .max()
        .unwrap_or(0);
    Snapshot {
        max_buffer_body_limit,
        pools,
        listeners,
        hash,
        config,
    }
}

fn build_pool(
    config: Arc<PoolConfig>,
    states: Vec<Arc<crate::core::state::BackendState>>,
    old: Option<&Pool>,
    shared: Arc<PoolShared>,
    clock: Clock,
) -> Pool {
    let backends: Vec<Backend> = config
        .backends
        .iter()
        .zip(states)
        .map(|(b, state)| Backend {
            addr: b.address.clone(),
            weight: b.weight,
            state,
        })
        .collect();
    let selector = match old {
        Some(old)
            if selection::same_build(
                (old.config.strategy, &old.config.steering, &old.backends),
                (config.strategy, &config.steering, &backends),
            ) =>
        {
            Arc::clone(&old.selector)
        }
        _ => selection::build(config.strategy, &config.steering, &backends, clock),
    };
    let affinity = config
        .steering
        .session_affinity
        .as_ref()
        .map(|a| AffinityCookies::build(a, &backends));
    let tls = config.tls.as_ref().map(|settings| {
        old.filter(|o| {
            o.config.tls.as_ref() == Some(settings) && o.config.protocol == config.protocol
        })
        .and_then(|o| o.tls.clone())
        .unwrap_or_else(|| Arc::new(ClientTls::new(client_files(settings, config.protocol))))
    });
    Pool {
        config,
        backends,
        selector,
        affinity,
        shared,
        tls,
    }
}

/// What a pool's TLS client is built from.
fn client_files(settings: &BackendTls, protocol: Protocol) -> ClientFiles {
    ClientFiles {
        ca: settings.ca.clone(),
        client_pair: settings
            .client_certificate
            .as_ref()
            .map(|c| (c.cert.clone(), c.key.clone())),
        insecure_skip_verify: settings.insecure_skip_verify,
        server_name: settings.server_name.clone(),
        alpn: protocol.alpn().iter().map(|a| a.to_vec()).collect(),
    }
}
