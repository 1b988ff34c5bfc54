//! Active health checks.
//!
//! One probe task per backend address, over a client of its own. The
//! supervisor starts a task for each address that appears in the config and
//! stops the task of each address that leaves (its stop signal ends it at
//! its next await: the wait between probes or the probe in flight), which
//! drops its client and so closes the idle connection it kept (a client
//! shared by all tasks would keep a removed backend's connection open until
//! its idle timeout, one fd per backend removed); tasks of addresses that
//! stay keep running (and keep their pass/fail streaks) across reloads.
//! Each task reads the current config on every tick, so a new interval,
//! timeout or threshold applies from the next probe. The supervisor runs
//! until lb's stop signal (shutdown), and ends every probe task before it
//! ends itself.
//!
//! At startup the first probes are spread over one interval (1,000 backends
//! do not all fire at once); a backend added by a reload is probed at once.
//! A backend starts eligible and is taken out after `unhealthy_threshold`
//! failures in a row; it comes back after `healthy_threshold` passes.
//!
//! A probe is a GET of `health_check.path` in http mode (over HTTP/2 with
//! prior knowledge for a `protocol: h2c` pool, whose backends may speak
//! nothing else) and a plain TCP connect in tcp mode (no path); thresholds, logs and the carry-over of
//! streaks across reloads are the same for both.
//!
//! When the checks hold every backend of the pool down, one line says so
//! and why (`all 3 backends fail GET /health (404 Not Found): is
//! health_check.path right?`); the same verdict is kept in
//! [`Runtime::pool_down`] for the 503's body and `/status`, until a
//! backend is up again or a reload changes the pool.
//! A probe that fails on lb's own shortage ([`crate::obs::local`]: its fd
//! limit…) gives no verdict.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, HOST, USER_AGENT};
use hyper::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};

use crate::config::{BackendAddr, HealthCheck, PoolName, ProxyProtocol};
use crate::core::runtime::{Pool, Runtime};
use crate::core::state::BackendState;
use crate::http::client::BackendConnector;
use crate::obs::local::{Op, Shortage};
use crate::tcp::proxy_protocol::local_header;
use crate::tls::client::ClientTls;

type ProbeClient = Client<BackendConnector, Full<Bytes>>;

/// Bounds a probe's connect and TLS handshake; the probe's own timeout
/// (`health_check.timeout`) cuts it first.
const PROBE_CONNECT_BOUND: Duration = Duration::from_secs(60);

/// `http2`: HTTP/2 only (with prior knowledge, or ALPN h2 over TLS), for
/// the backends of a `protocol: h2c` or `h2` pool (which may speak nothing
/// else); `tls`: the pool's, so probes see the backend as requests do.
fn probe_client(http2: bool, tls: Option<Arc<ClientTls>>) -> ProbeClient {
    // Probes keep one connection per backend alive (as Envoy does) rather
    // than opening one per probe: far cheaper at 1,000 backends.
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_timer(TokioTimer::new())
        .http2_only(http2)
        .build(BackendConnector::new(PROBE_CONNECT_BOUND, tls))
}

/// One backend's probe clients: plain ones, and those of its pool's TLS
/// (rebuilt when the pool's `ClientTls` is replaced). Each connects lazily:
/// only the pool's protocol's is ever used.
struct ProbeClients {
    plain: (ProbeClient, ProbeClient),
    tls: Option<(Arc<ClientTls>, ProbeClient, ProbeClient)>,
}

impl ProbeClients {
    fn new() -> Self {
        ProbeClients {
            plain: (probe_client(false, None), probe_client(true, None)),
            tls: None,
        }
    }

    fn for_settings(&mut self, settings: &ProbeSettings) -> &ProbeClient {
        let (any, http2_only) = match &settings.tls {
            None => (&self.plain.0, &self.plain.1),
            Some(tls) => {
                let current = self.tls.as_ref().is_some_and(|(t, ..)| Arc::ptr_eq(t, tls));
                if !current {
                    self.tls = Some((
                        Arc::clone(tls),
                        probe_client(false, Some(Arc::clone(tls))),
                        probe_client(true, Some(Arc::clone(tls))),
                    ));
                }
                // Cannot fail: `self.tls` was either current or set just above.
                let (_, any, http2_only) = self.tls.as_ref().expect("set above");
                (any, http2_only)
            }
        };
        if settings.http2 {
            http2_only
        } else {
            any
        }
    }
}

/// A probe the backend did not answer: lb's own shortage (no verdict) or
/// the backend's failure.
fn unanswered(e: hyper_util::client::legacy::Error) -> ProbeFailure {
    let why = crate::http::client::root_cause(&e).to_string();
    match Shortage::in_chain(&e).filter(|_| e.is_connect()) {
        Some(shortage) => ProbeFailure::Local(shortage, why),
        None => ProbeFailure::Failed(why),
    }
}

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ProbeFailure {
    /// The backend answered, with a status that is not 2xx or 3xx.
    Status(StatusCode),
    /// No answer: refused, reset, unreachable…
    Failed(String),
    /// No answer within `health_check.timeout`.
    TimedOut(Duration),
    /// lb's own shortage (see [`crate::obs::local`]): no verdict on the backend.
    Local(Shortage, String),
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeFailure::Status(status) => write!(f, "health check answered {status}"),
            ProbeFailure::Failed(e) => write!(f, "health check failed: {e}"),
            ProbeFailure::TimedOut(limit) => write!(f, "health check timed out after {limit:?}"),
            ProbeFailure::Local(_, e) => write!(f, "health check failed: {e}"),
        }
    }
}

impl ProbeFailure {
    /// The cause alone, for the pool's verdict.
    fn cause(&self) -> String {
        match self {
            ProbeFailure::Status(status) => status.to_string(),
            ProbeFailure::Failed(e) => e.clone(),
            ProbeFailure::TimedOut(limit) => format!("no answer within {limit:?}"),
            ProbeFailure::Local(_, e) => e.clone(),
        }
    }

    /// What to look at when every backend fails this way.
    fn hint(&self) -> Option<&'static str> {
        match self {
            ProbeFailure::Status(status) if status.is_client_error() => {
                Some("is health_check.path right?")
            }
            ProbeFailure::Failed(_) => Some("are the backends running at these addresses?"),
            ProbeFailure::TimedOut(_) => Some("is health_check.timeout long enough?"),
            ProbeFailure::Status(_) | ProbeFailure::Local(..) => None,
        }
    }
}

/// The last failure of each backend the checks hold down, shared by the
/// probe tasks (never touched on the request path).
type DownReasons = Arc<Mutex<HashMap<(PoolName, BackendAddr), ProbeFailure>>>;

/// The verdict when health checks hold every backend of the pool down,
/// without addresses (it goes into the clients' 503): `all 3 backends fail
/// GET /health (404 Not Found): is health_check.path right?`, or with mixed
/// causes `(404 Not Found ×2, connection refused ×1)`.
fn pool_verdict(
    pool: &Pool,
    reasons: &HashMap<(PoolName, BackendAddr), ProbeFailure>,
) -> Option<String> {
    let hc = pool.config.health_check.as_ref()?;
    if pool.backends.is_empty() || pool.backends.iter().any(|b| b.state.is_healthy()) {
        return None;
    }
    let failures: Vec<&ProbeFailure> = pool
        .backends
        .iter()
        .map(|b| reasons.get(&(pool.name().clone(), b.addr.clone())))
        .collect::<Option<_>>()?;
    let check = match (&hc.path, &hc.grpc) {
        (Some(path), _) => format!("GET {path}"),
        (None, Some(_)) => "the gRPC health check".to_owned(),
        (None, None) => "the TCP connect check".to_owned(),
    };
    let who = match failures.len() {
        1 => "the only backend fails".to_owned(),
        n => format!("all {n} backends fail"),
    };
    let first = failures[0];
    if failures.iter().all(|f| *f == first) {
        let hint = first.hint().map(|h| format!(": {h}")).unwrap_or_default();
        return Some(format!("{who} {check} ({}){hint}", first.cause()));
    }
    let mut counts: Vec<(String, usize)> = Vec::new();
    for cause in failures.iter().map(|f| f.cause()) {
        match counts.iter_mut().find(|(c, _)| *c == cause) {
            Some((_, n)) => *n += 1,
            None => counts.push((cause, 1)),
        }
    }
    let causes: Vec<String> = counts.iter().map(|(c, n)| format!("{c} ×{n}")).collect();
    Some(format!("{who} {check} ({})", causes.join(", ")))
}

/// Recomputes every pool's verdict and logs each once when it changes.
fn judge_pool(runtime: &Runtime, reasons: &DownReasons) {
    let snap = runtime.snapshot();
    let reasons = reasons.lock().unwrap_or_else(PoisonError::into_inner);
    for pool in &snap.pools {
        let verdict = pool_verdict(pool, &reasons);
        let current = pool.shared.down.load();
        if current.as_deref() == verdict.as_ref() {
            continue;
        }
        // A file with named pools says which one.
        let which = if snap.pools.len() == 1 && pool.name().as_str() == PoolName::DEFAULT {
            String::new()
        } else {
            format!("pool {}: ", pool.name())
        };
        match &verdict {
            Some(why) => tracing::error!("{which}no backend can be used: {why}"),
            None if current.is_some() => {
                tracing::info!("{which}the pool has a healthy backend again")
            }
            None => {}
        }
        pool.shared.down.store(verdict.map(Arc::new));
    }
}

/// One backend's probe task, and what ends it.
struct Probe {
    /// Sending or dropping this ends the task at its next await point.
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Probe {
    fn start(probing: impl std::future::Future<Output = ()> + Send + 'static) -> Probe {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tokio::select! {
                () = probing => {}
                _ = stopped => {}
            }
        });
        Probe { stop, task }
    }
}

/// Keeps one probe task per backend, until `stop` says `true` (or its
/// sender is gone); then ends every probe task and waits for them.
pub async fn supervise(runtime: Arc<Runtime>, mut stop: watch::Receiver<bool>) {
    let mut changes = runtime.subscribe();
    let reasons = DownReasons::default();
    // One probe task per (pool, address): the same address in two pools is
    // probed by each, with each pool's settings.
    let mut probes: HashMap<(PoolName, BackendAddr), Probe> = HashMap::new();
    let mut startup = true;
    loop {
        let snap = runtime.snapshot();
        // A probe dropped here is told to stop: it ends at its next await.
        probes.retain(|(pool, addr), _| {
            snap.pools.iter().any(|p| {
                p.name() == pool
                    && p.config.health_check.is_some()
                    && p.backends.iter().any(|b| &b.addr == addr)
            })
        });
        for pool in &snap.pools {
            let Some(hc) = &pool.config.health_check else {
                for b in &pool.backends {
                    if b.state.set_healthy(true) {
                        tracing::info!("backend {} is up (health checks turned off)", b.addr);
                    }
                }
                continue;
            };
            {
                for b in &pool.backends {
                    let key = (pool.name().clone(), b.addr.clone());
                    if probes.contains_key(&key) {
                        continue;
                    }
                    // validate() parsed every address as an authority.
                    let Ok(authority) = b.addr.as_str().parse::<Authority>() else {
                        continue;
                    };
                    let first_delay = if startup {
                        hc.interval.mul_f64(fastrand::f64())
                    } else {
                        Duration::ZERO
                    };
                    let probe = Probe::start(probe_loop(
                        Arc::downgrade(&runtime),
                        Arc::clone(&b.state),
                        authority,
                        first_delay,
                        Arc::clone(&reasons),
                    ));
                    probes.insert(key, probe);
                }
            }
        }
        reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|key, _| probes.contains_key(key));
        judge_pool(&runtime, &reasons);
        startup = false;
        drop(snap);
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = stop.wait_for(|&stop| stop) => break,
        }
    }
    let tasks: Vec<JoinHandle<()>> = probes
        .into_values()
        .map(|Probe { stop, task }| {
            let _ = stop.send(());
            task
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

/// Probes one backend forever, applying the thresholds of the current config.
async fn probe_loop(
    runtime: std::sync::Weak<Runtime>,
    state: Arc<BackendState>,
    authority: Authority,
    first_delay: Duration,
    reasons: DownReasons,
) {
    // Owned by this task: ending the task closes the backend's connection.
    let mut clients = ProbeClients::new();
    let Some(mut changes) = runtime.upgrade().map(|rt| rt.subscribe()) else {
        return;
    };
    let (mut passes, mut failures) = (0u32, 0u32);
    let mut due = Instant::now() + first_delay;
    loop {
        // Wait for the next probe; a reload that shortens the interval
        // brings it forward.
        loop {
            tokio::select! {
                () = sleep_until(due) => break,
                changed = changes.changed() => {
                    let Some(now) = changed.ok().and_then(|()| current(&runtime, &state.pool)) else { return };
                    due = due.min(Instant::now() + now.check.interval);
                }
            }
        }
        let started = Instant::now();
        let Some(settings) = current(&runtime, &state.pool) else {
            return;
        };
        let client = clients.for_settings(&settings);
        let result = probe(client, &authority, &settings).await;
        let hc = &settings.check;
        if let Err(ProbeFailure::Local(shortage, why)) = &result {
            // lb's own shortage says nothing about the backend: no verdict.
            if let Some(rt) = runtime.upgrade() {
                let what = format_args!("health check of {}: {why}", state.addr);
                rt.local_errors
                    .record(Op::HealthCheck, *shortage, rt.clock.now_ms(), what);
            }
            due = started + hc.interval;
            continue;
        }
        state.metrics.health_check(result.is_ok());
        match result {
            Ok(()) => {
                passes += 1;
                failures = 0;
                if !state.is_healthy()
                    && passes >= hc.healthy_threshold.get()
                    && state.set_healthy(true)
                {
                    tracing::info!("backend {} is up", state.addr);
                    reasons
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&(state.pool.clone(), state.addr.clone()));
                    if let Some(rt) = runtime.upgrade() {
                        judge_pool(&rt, &reasons);
                    }
                }
            }
            Err(reason) => {
                failures += 1;
                passes = 0;
                if state.is_healthy()
                    && failures >= hc.unhealthy_threshold.get()
                    && state.set_healthy(false)
                {
                    tracing::warn!("backend {} is down ({reason})", state.addr);
                }
                if !state.is_healthy() {
                    // Kept up to date while down: the pool's verdict
                    // follows the current cause.
                    let changed = reasons
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert((state.pool.clone(), state.addr.clone()), reason.clone())
                        .as_ref()
                        != Some(&reason);
                    if let (true, Some(rt)) = (changed, runtime.upgrade()) {
                        judge_pool(&rt, &reasons);
                    }
                }
            }
        }
        due = started + hc.interval;
    }
}

/// What a probe needs from the current config, if lb still runs and checks.
struct ProbeSettings {
    check: HealthCheck,
    /// `send_proxy_protocol` (tcp mode): a TCP probe opens with the header.
    proxy_protocol: Option<ProxyProtocol>,
    /// The pool speaks HTTP/2 only: so do its probes.
    http2: bool,
    /// The pool's backends are HTTPS: so are its probes.
    tls: Option<Arc<ClientTls>>,
}

fn current(runtime: &std::sync::Weak<Runtime>, pool: &PoolName) -> Option<ProbeSettings> {
    let snap = runtime.upgrade()?.snapshot();
    let pool = snap.pools.iter().find(|p| p.name() == pool)?;
    Some(ProbeSettings {
        check: pool.config.health_check.clone()?,
        proxy_protocol: snap.config.send_proxy_protocol,
        http2: pool.config.protocol.is_http2(),
        tls: pool.tls.clone(),
    })
}

/// One probe of the kind the config asks for.
async fn probe(
    client: &ProbeClient,
    authority: &Authority,
    settings: &ProbeSettings,
) -> Result<(), ProbeFailure> {
    let hc = &settings.check;
    let scheme = if settings.tls.is_some() {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    match (&hc.path, &hc.grpc) {
        (Some(path), _) => http_probe(client, scheme, authority, path.clone(), hc.timeout).await,
        (None, Some(service)) => grpc_probe(client, scheme, authority, service, hc.timeout).await,
        (None, None) => tcp_probe(authority, hc.timeout, settings.proxy_protocol).await,
    }
}

/// A TCP connect within the timeout passes (after writing the PROXY
/// protocol's `LOCAL` header, when backends get one); the connection is
/// closed at once.
async fn tcp_probe(
    authority: &Authority,
    limit: Duration,
    proxy_protocol: Option<ProxyProtocol>,
) -> Result<(), ProbeFailure> {
    let exchange = async {
        let mut stream = TcpStream::connect(authority.as_str()).await?;
        if let Some(version) = proxy_protocol {
            stream.write_all(&local_header(version)).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    match timeout(limit, exchange).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(match Shortage::of(&e) {
            Some(shortage) => ProbeFailure::Local(shortage, e.to_string()),
            None => ProbeFailure::Failed(e.to_string()),
        }),
        Err(_) => Err(ProbeFailure::TimedOut(limit)),
    }
}

/// One call of grpc.health.v1.Health/Check for `service` (over the h2c
/// client): an OK answer saying SERVING within the timeout passes.
async fn grpc_probe(
    client: &ProbeClient,
    scheme: Scheme,
    authority: &Authority,
    service: &str,
    limit: Duration,
) -> Result<(), ProbeFailure> {
    let uri = format!("{scheme}://{authority}/grpc.health.v1.Health/Check");
    let mut req = Request::new(Full::new(grpc_health::request(service)));
    *req.method_mut() = hyper::Method::POST;
    *req.uri_mut() = uri
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| ProbeFailure::Failed(e.to_string()))?;
    let headers = req.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
    headers.insert(USER_AGENT, HeaderValue::from_static("lb-health-check"));
    let exchange = async {
        let resp = client.request(req).await.map_err(unanswered)?;
        let (parts, body) = resp.into_parts();
        if !parts.status.is_success() {
            return Err(ProbeFailure::Status(parts.status));
        }
        let collected = body
            .collect()
            .await
            .map_err(|e| ProbeFailure::Failed(e.to_string()))?;
        // grpc-status in the trailers, or in the head of a trailers-only answer.
        let trailers = collected.trailers().cloned();
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| parts.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if status != "0" {
            let message = trailers
                .as_ref()
                .and_then(|t| t.get("grpc-message"))
                .or_else(|| parts.headers.get("grpc-message"))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            return Err(ProbeFailure::Failed(format!(
                "grpc-status {status:?} {message}"
            )));
        }
        match grpc_health::serving(&collected.to_bytes()) {
            Some(1) => Ok(()),
            Some(n) => Err(ProbeFailure::Failed(format!(
                "gRPC health {}",
                grpc_health::status_name(n)
            ))),
            None => Err(ProbeFailure::Failed("not a gRPC health answer".to_owned())),
        }
    };
    match timeout(limit, exchange).await {
        Ok(result) => result,
        Err(_) => Err(ProbeFailure::TimedOut(limit)),
    }
}

/// grpc.health.v1's two messages, by hand (one field each).
mod grpc_health {
    use hyper::body::Bytes;

    /// A gRPC-framed `HealthCheckRequest { service }`.
    pub fn request(service: &str) -> Bytes {
        let mut msg = Vec::with_capacity(service.len() + 6);
        if !service.is_empty() {
            msg.push(0x0a); // field 1, length-delimited
            varint(&mut msg, service.len() as u64);
            msg.extend_from_slice(service.as_bytes());
        }
        let mut out = Vec::with_capacity(5 + msg.len());
        out.push(0); // not compressed
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(&msg);
        Bytes::from(out)
    }

    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *bytes.get(*at)?;
            *at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The `status` of a gRPC-framed `HealthCheckResponse` (0 when absent,
    /// as proto3 leaves a default out); `None` if it is not one.
    pub fn serving(body: &[u8]) -> Option<u64> {
        let (prefix, rest) = body.split_at_checked(5)?;
        if prefix[0] != 0 {
            return None; // compressed: lb asked for none
        }
        let len = u32::from_be_bytes(prefix[1..5].try_into().ok()?) as usize;
        let msg = rest.get(..len)?;
        let (mut at, mut status) = (0, 0);
        while at < msg.len() {
            let key = read_varint(msg, &mut at)?;
            match key & 7 {
                0 => {
                    let v = read_varint(msg, &mut at)?;
                    if key >> 3 == 1 {
                        status = v;
                    }
                }
                2 => {
                    let n = read_varint(msg, &mut at)? as usize;
                    at = at.checked_add(n).filter(|&end| end <= msg.len())?;
                }
                1 => at += 8,
                5 => at += 4,
                _ => return None,
            }
        }
        Some(status)
    }

    pub fn status_name(n: u64) -> &'static str {
        match n {
            0 => "UNKNOWN",
            1 => "SERVING",
            2 => "NOT_SERVING",
            3 => "SERVICE_UNKNOWN",
            _ => "status unknown to lb",
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn messages_by_hand() {
            assert_eq!(&request("")[..], &[0, 0, 0, 0, 0]);
            assert_eq!(
                &request("a.B")[..],
                &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']
            );
            assert_eq!(serving(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
            assert_eq!(serving(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
            assert_eq!(serving(&[0, 0, 0, 0, 0]), Some(0));
            assert_eq!(serving(&[0, 0, 0]), None);
        }
    }
}

/// One GET of the health path: a 2xx or 3xx within the timeout passes.
async fn http_probe(
    client: &ProbeClient,
    scheme: Scheme,
    authority: &Authority,
    path: PathAndQuery,
    limit: Duration,
) -> Result<(), ProbeFailure> {
    let mut parts = hyper::http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(path);
    let uri = Uri::from_parts(parts).map_err(|e| ProbeFailure::Failed(e.to_string()))?;
    let mut req = Request::new(Full::default());
    *req.uri_mut() = uri;
    if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
        req.headers_mut().insert(HOST, host);
    }
    req.headers_mut()
        .insert(USER_AGENT, HeaderValue::from_static("lb-health-check"));
    let exchange = async {
        let resp = client.request(req).await.map_err(unanswered)?;
        let status = resp.status();
        // Read the (small) body so the connection can be reused.
        let _ = resp.into_body().collect().await;
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(ProbeFailure::Status(status))
        }
    };
    match timeout(limit, exchange).await {
        Ok(result) => result,
        Err(_) => Err(ProbeFailure::TimedOut(limit)),
    }
}
