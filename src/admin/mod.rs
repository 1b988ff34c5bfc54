//! The admin listener (`admin: 127.0.0.1:9901`): a small HTTP/1.1 server
//! apart from the proxy port, never proxied.
//!
//! * `GET /metrics`: Prometheus/OpenMetrics text (see [`crate::obs::metrics`]);
//! * `GET /status`: JSON: version, config, last reload, backends;
//! * `GET /healthz`: 200 while the process can answer;
//! * `GET /readyz`: 200 while serving, 503 from the moment shutdown begins;
//! * `POST /reload`: the reload SIGHUP does; 200 when applied (or the file
//!   is unchanged), 422 with the error when rejected.
//!
//! `/metrics` is encoded on a blocking thread, one scrape at a time, never
//! on the runtime that runs health checks and the reloader: at 10,000
//! backends one encoding is ~150,000 series and tens of milliseconds of CPU.
//! A scrape that arrives within [`REUSE_FACTOR`] times the last encoding's
//! CPU time, with the same config applied, gets that body again (only when
//! encoding costs at least [`CHEAP_SCRAPE`]): however hard `/metrics` is
//! scraped, encoding takes about 1 % of a core, and a body is at most 99
//! encodings old (under 2 s at 10,000 backends and 18 ms an encoding), well
//! within any scrape interval. A reload shows at once.
//!
//! The address is reloadable: a task follows every applied config, until
//! lb's stop signal (shutdown), and binds, moves or closes the listener. A
//! move that cannot bind is logged and the old listener keeps serving (the
//! rest of the config is applied).
//! The listener keeps answering through shutdown's drain, until
//! [`Admin::stop`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Mutex as AsyncMutex, Semaphore};
use tokio::task::JoinHandle;

pub mod exposition;

use crate::core::runtime::{LastReload, Runtime, Snapshot};
use crate::obs::metrics::unix_seconds;
use crate::reload::ReloadHandle;

/// Admin connections served at once; more wait in the kernel's queue.
const MAX_CONNECTIONS: usize = 64;
/// A scraper that sends nothing for this long is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A `/metrics` body is served again while it is younger than this many
/// times the CPU time its encoding took: encoding then costs at most about
/// 1/(1 + REUSE_FACTOR) of a core, however often lb is scraped.
pub const REUSE_FACTOR: u32 = 99;
/// Encodings cheaper than this are never reused: small configs (and tests)
/// always see counters as of their scrape.
pub const CHEAP_SCRAPE: Duration = Duration::from_millis(1);

/// The admin listener and what its handlers need.
#[derive(Debug)]
pub struct Admin {
    runtime: Arc<Runtime>,
    reload: ReloadHandle,
    /// Shown in `/status`.
    config_path: PathBuf,
    /// The socket serving now, if any; touched on reload and shutdown only.
    bound: Mutex<Bound>,
    /// The last `/metrics` body; held across an encoding, so scrapes encode
    /// one at a time and those that waited can reuse its result.
    last_scrape: AsyncMutex<Option<Scrape>>,
}

/// One encoded `/metrics` body and what it cost.
#[derive(Debug)]
struct Scrape {
    body: Bytes,
    /// When encoding began: the counters are as of then.
    at: Instant,
    /// CPU time the encoding took.
    cost: Duration,
    /// The config it shows.
    snapshot: Arc<Snapshot>,
}

impl Scrape {
    fn reusable(&self, now: Instant, snapshot: &Arc<Snapshot>) -> bool {
        self.cost >= CHEAP_SCRAPE
            && Arc::ptr_eq(&self.snapshot, snapshot)
            && now.saturating_duration_since(self.at) < self.cost * REUSE_FACTOR
    }
}

/// The admin socket currently accepting.
#[derive(Debug, Default)]
struct Bound {
    /// The configured `admin` value it was bound for (may be port 0).
    configured: Option<SocketAddr>,
    /// What the OS bound.
    local: Option<SocketAddr>,
    /// Firing or dropping this stops the accept loop.
    stop: Option<oneshot::Sender<()>>,
    /// Set by `stop()`: no rebinding after shutdown.
    stopped: bool,
}

impl Admin {
    /// Binds the configured admin address (if any) and follows reloads
    /// until `stop` says `true` (or its sender is gone). A failed bind is
    /// logged; `local_addr()` then says `None`.
    pub fn start(
        runtime: Arc<Runtime>,
        reload: ReloadHandle,
        config_path: PathBuf,
        mut stop: watch::Receiver<bool>,
    ) -> (Arc<Admin>, JoinHandle<()>) {
        let admin = Arc::new(Admin {
            runtime,
            reload,
            config_path,
            bound: Mutex::new(Bound::default()),
            last_scrape: AsyncMutex::new(None),
        });
        admin.sync();
        let follower = Arc::clone(&admin);
        let task = tokio::spawn(async move {
            let mut changes = follower.runtime.subscribe();
            loop {
                tokio::select! {
                    changed = changes.changed() => match changed {
                        Ok(()) => follower.sync(),
                        Err(_) => break,
                    },
                    _ = stop.wait_for(|&stop| stop) => break,
                }
            }
        });
        (admin, task)
    }

    fn bound(&self) -> std::sync::MutexGuard<'_, Bound> {
        self.bound.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the admin listener answers now.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.bound().local
    }

    /// Stops accepting (the end of shutdown).
    pub fn stop(&self) {
        let mut bound = self.bound();
        bound.stopped = true;
        bound.local = None;
        if let Some(stop) = bound.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Makes the listener match the current config's `admin`.
    fn sync(self: &Arc<Self>) {
        let wanted = self.runtime.snapshot().config.admin;
        let mut bound = self.bound();
        if bound.stopped
            || (wanted == bound.configured && (wanted.is_none() || bound.local.is_some()))
        {
            return;
        }
        let Some(addr) = wanted else {
            if let Some(stop) = bound.stop.take() {
                let _ = stop.send(());
            }
            tracing::info!("admin listener closed");
            *bound = Bound::default();
            return;
        };
        // A port the admin listener is not on yet cannot be its own.
        let bind = match bound.local {
            Some(local) if local.port() == addr.port() => crate::net::listen::bind,
            _ => crate::net::listen::bind_alone,
        };
        match bind(addr).and_then(TcpListener::from_std) {
            Ok(listener) => {
                let local = listener.local_addr().unwrap_or(addr);
                let stop = self.spawn_accept_loop(listener);
                if let Some(old) = bound.stop.replace(stop) {
                    let _ = old.send(());
                }
                bound.configured = Some(addr);
                bound.local = Some(local);
                tracing::info!("admin listener on {local}");
            }
            Err(e) => {
                tracing::error!(
                    "cannot listen on {addr} (admin): {e}; the admin listener stays where it was"
                );
            }
        }
    }

    fn spawn_accept_loop(self: &Arc<Self>, listener: TcpListener) -> oneshot::Sender<()> {
        let (tx, mut rx) = oneshot::channel();
        let admin = Arc::clone(self);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
            loop {
                let permit = tokio::select! {
                    biased;
                    _ = &mut rx => break,
                    permit = Arc::clone(&slots).acquire_owned() => permit,
                };
                let Ok(permit) = permit else { break };
                let stream = tokio::select! {
                    biased;
                    _ = &mut rx => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            if let Some(shortage) = crate::obs::local::Shortage::of(&e) {
                                admin.runtime.local_errors.count(crate::obs::local::Op::Accept, shortage);
                            }
                            tracing::debug!(error = %e, "admin accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let admin = Arc::clone(&admin);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let admin = Arc::clone(&admin);
                        async move { Ok::<_, Infallible>(admin.route(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    drop(permit);
                });
            }
        });
        tx
    }

    /// The `/metrics` body: the last one when it may be reused (see the
    /// module doc), else a new encoding on a blocking thread. `None` only if
    /// that thread panicked.
    async fn metrics(&self) -> Option<Bytes> {
        let mut last = self.last_scrape.lock().await;
        let snapshot = self.runtime.snapshot();
        let now = Instant::now();
        if let Some(scrape) = last.as_ref().filter(|s| s.reusable(now, &snapshot)) {
            return Some(scrape.body.clone());
        }
        let runtime = Arc::clone(&self.runtime);
        let encoded = tokio::task::spawn_blocking(move || {
            let cpu_before = thread_cpu_time();
            let body = crate::admin::exposition::render(&runtime);
            (body, thread_cpu_time().saturating_sub(cpu_before))
        })
        .await;
        let (body, cost) = match encoded {
            Ok(encoded) => encoded,
            Err(e) => {
                tracing::error!("encoding /metrics failed: {e}");
                return None;
            }
        };
        let body = Bytes::from(body);
        *last = Some(Scrape {
            body: body.clone(),
            at: now,
            cost,
            snapshot,
        });
        Some(body)
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let rt = &self.runtime;
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/metrics") => match self.metrics().await {
                Some(body) => {
                    let mut resp = Response::new(Full::new(body));
                    resp.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    resp
                }
                None => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
            },
            (&Method::GET | &Method::HEAD, "/status") => json_reply(StatusCode::OK, &self.status()),
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET | &Method::HEAD, "/readyz") => {
                if rt.shutting_down.load(Relaxed) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            }
            (&Method::POST, "/reload") => match self.reload.reload_and_wait(rt).await {
                None => json_reply(
                    StatusCode::OK,
                    &json!({ "result": "unchanged", "hash": rt.snapshot().hash.to_string() }),
                ),
                Some(r) if r.ok => json_reply(
                    StatusCode::OK,
                    &json!({ "result": "applied", "hash": rt.snapshot().hash.to_string() }),
                ),
                Some(r) => {
                    let mut body = reload_json(&r);
                    body["result"] = json!("rejected");
                    json_reply(StatusCode::UNPROCESSABLE_ENTITY, &body)
                }
            },
            (_, "/metrics" | "/status" | "/healthz" | "/readyz" | "/reload") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics /status /healthz /readyz or POST /reload\n",
            ),
        }
    }

    fn status(&self) -> serde_json::Value {
        let rt = &self.runtime;
        let snap = rt.snapshot();
        let now_ms = rt.clock.now_ms();
        let backend_json = |b: &crate::core::selection::Backend| {
            json!({
                "address": b.addr.as_str(),
                "pool": b.state.pool.as_str(),
                "weight": b.weight,
                "healthy": b.state.is_healthy(),
                "ejected": b.state.is_ejected(now_ms),
                "in_flight": b.state.in_flight(),
                "requests": b.state.requests(),
                "failures": b.state.failures(),
            })
        };
        let backends: Vec<_> = snap.all_backends().map(backend_json).collect();
        let resolutions = rt.discovered.status();
        let pools: serde_json::Map<String, serde_json::Value> = snap
            .pools
            .iter()
            .map(|p| {
                let discovery = p.config.discovery.as_ref().map(|d| {
                    let last = resolutions.iter().find(|(name, _, _)| name == p.name());
                    json!({
                        "name": d.describe(),
                        "refresh": humantime::format_duration(d.refresh).to_string(),
                        "resolver": d.resolver.map_or_else(|| "system".to_owned(), |r| r.to_string()),
                        "last_resolution": last.map(|(_, r, _)| json!({
                            "at": rfc3339(r.at),
                            "result": r.result,
                            "applied_cpu_ms": r.applied_cpu_ms,
                            "addresses": r.addresses.iter().map(|(a, ttl)| json!({"address": a, "ttl": ttl})).collect::<Vec<_>>(),
                        })),
                    })
                });
                let routes: Vec<String> = snap
                    .config
                    .routes
                    .iter()
                    .filter(|r| snap.config.pools[r.pool].name == *p.name())
                    .map(ToString::to_string)
                    .collect();
                let value = json!({
                    "strategy": p.config.strategy.name(),
                    "pool_down": p.shared.down.load_full().as_deref().map(String::as_str),
                    "routes": routes,
                    "discovery": discovery,
                    "backends": p.backends.iter().map(backend_json).collect::<Vec<_>>(),
                });
                (p.name().to_string(), value)
            })
            .collect();
        let last = rt.reloads.last();
        json!({
            "version": crate::VERSION,
            "commit": crate::GIT_COMMIT,
            "config": {
                "path": self.config_path.display().to_string(),
                "hash": snap.hash.to_string(),
                "loaded_at": rfc3339(last.applied_at),
                "loaded_at_unix": unix_seconds(last.applied_at),
                "listen": snap.config.listen().to_string(),
                "strategy": snap.first_pool().config.strategy.name(),
            },
            "last_reload": reload_json(&last),
            "reloads": {
                "applied": rt.reloads.applied.load(Relaxed).saturating_sub(1),
                "rejected": rt.reloads.rejected.load(Relaxed),
            },
            "shutting_down": rt.shutting_down.load(Relaxed),
            // A single-pool file's verdict; each pool's is under `pools`.
            "pool_down": snap.pools.iter().find_map(|p| p.shared.down.load_full()).as_deref().map(String::as_str),
            "connections": {
                "active": rt.connections.open(),
                "total": rt.connections.total(),
                "upgraded": rt.upgrades.open(),
            },
            "backends": backends,
            "pools": pools,
            "tls": tls_json(rt),
            "listeners": snap.config.listeners.iter().map(|l| json!({
                "name": l.name.as_str(),
                "address": l.address.to_string(),
                "mode": l.mode.name(),
                "tls": l.tls.is_some(),
                "redirect_https": l.redirect_https,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The certificates served, with why their files are not applied (if so).
fn tls_json(rt: &Runtime) -> serde_json::Value {
    let certificates = rt.tls.certificates();
    if certificates.is_empty() {
        return serde_json::Value::Null;
    }
    let certificates: Vec<_> = certificates
        .iter()
        .map(|(listener, c)| {
            json!({
                "listener": listener,
                "cert": c.cert_file.display().to_string(),
                "key": c.key_file.display().to_string(),
                "names": c.names,
                "not_after": rfc3339(c.not_after),
                "error": c.error,
            })
        })
        .collect();
    json!({
        "certificates": certificates,
        "handshake_failures": rt.tls.handshake_failures.load(Relaxed),
        "reload_failures": rt.tls.reload_failures.load(Relaxed),
    })
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The last reload as JSON, with the error's line and column pulled out
/// when the message has them.
fn reload_json(r: &LastReload) -> serde_json::Value {
    let (line, column) = r
        .error
        .as_deref()
        .map_or((None, None), crate::config::line_column);
    json!({
        "result": if r.ok { "success" } else { "failure" },
        "time": rfc3339(r.at),
        "error": r.error,
        "line": line,
        "column": column,
    })
}

/// CPU time the calling thread has used: what an encoding cost, whatever
/// else the machine was doing meanwhile.
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body.to_owned())
}

fn json_reply(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", format!("{value}\n"))
}

#[cfg(test)]
mod tests {
    use crate::config::line_column;

    #[test]
    fn finds_line_and_column() {
        assert_eq!(
            line_column("c.yaml:4:7: backends[0]: expected a mapping, found \"x:1\""),
            (Some(4), Some(7))
        );
        assert_eq!(
            line_column(
                "environment variable LB_RETRY__ATTEMPTS: retry.attempts: expected an integer"
            ),
            (None, None)
        );
        assert_eq!(line_column("cannot listen on 1.2.3.4:80"), (None, None));
        assert_eq!(
            line_column("/etc/lb/c.yaml:12:5: timeouts.connect: must be greater than zero"),
            (Some(12), Some(5))
        );
        assert_eq!(
            line_column("cannot listen on [::1]:80: address in use"),
            (None, None)
        );
    }
}
