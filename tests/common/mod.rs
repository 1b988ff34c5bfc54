//! Test harness: real backends and a real lb on ephemeral 127.0.0.1 ports.
//!
//! * [`Backend`]: an in-process hyper server whose behaviour tests change
//!   while it runs (status, delay, reset, `/health` status, stop/start).
//! * [`TestLb`]: lb started in-process on `127.0.0.1:0` from a real config
//!   file in a temp dir, so reload tests rewrite that file.
//! * [`LbProcess`]: the real `lb` binary, for the CLI and signals.
//! * [`eventually!`]: wait for a condition with a deadline, never sleep-and-hope.
#![allow(dead_code)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Deadline in seconds for what a test waits on with [`eventually!`]:
/// generous, because a loaded machine may take seconds for what takes
/// milliseconds at rest. Nothing waits this long when things work.
pub const WAIT: u64 = 20;

/// Polls `$cond` every 10 ms until it holds; panics after `$secs` seconds.
#[macro_export]
macro_rules! eventually {
    ($secs:expr, $cond:expr) => {
        $crate::eventually!($secs, $cond, "{}", stringify!($cond))
    };
    ($secs:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs_f64($secs as f64);
        loop {
            if $cond {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("condition not met within {}s: {}", $secs, format!($($msg)+));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }};
}

/// One request as a backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The path with its query, as the request line had them.
    pub target: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// Behaviour knobs, changed by tests while the backend runs.
#[derive(Debug, Default)]
pub struct Behavior {
    /// Answer this status to every non-health request (0 = 200).
    pub status: AtomicU16,
    /// Answer this status on `/health` (0 = 200).
    pub health_status: AtomicU16,
    /// Delay every non-health answer by this many ms.
    pub delay_ms: AtomicU64,
    /// Drop the connection after reading the request, without answering.
    pub reset: AtomicBool,
    /// Answer this many requests with `reset`/`status` and then behave (0 = always).
    pub only_first: AtomicUsize,
}

/// An in-process HTTP backend on 127.0.0.1.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub behavior: Arc<Behavior>,
    /// Non-health requests received (including reset/failed ones).
    hits: Arc<AtomicUsize>,
    /// Health probes received.
    probes: Arc<AtomicUsize>,
    /// Every non-health request, in arrival order.
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Listener and all its connections; aborting them frees the port.
    tasks: Option<JoinSet<()>>,
}

impl Backend {
    /// Starts a backend on an ephemeral port; its body is `name`.
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, name)
    }

    /// Starts many backends named `b0`, `b1`, ….
    pub async fn start_many(n: usize) -> Vec<Backend> {
        let mut v = Vec::new();
        for i in 0..n {
            v.push(Backend::start(&format!("b{i}")).await);
        }
        v
    }

    pub fn serve(listener: TcpListener, name: &str) -> Backend {
        let mut b = Backend {
            addr: listener.local_addr().unwrap(),
            name: name.to_owned(),
            behavior: Arc::default(),
            hits: Arc::default(),
            probes: Arc::default(),
            seen: Arc::default(),
            tasks: None,
        };
        b.spawn(listener);
        b
    }

    fn spawn(&mut self, listener: TcpListener) {
        let mut tasks = JoinSet::new();
        let (name, behavior, hits, probes, seen) = (
            self.name.clone(),
            self.behavior.clone(),
            self.hits.clone(),
            self.probes.clone(),
            self.seen.clone(),
        );
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let conns2 = conns.clone();
        tasks.spawn(async move {
            // Holding the connection set here means aborting this task
            // aborts every connection with it.
            let _conns = conns2;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (name, behavior, hits, probes, seen) = (
                    name.clone(),
                    behavior.clone(),
                    hits.clone(),
                    probes.clone(),
                    seen.clone(),
                );
                let svc = service_fn(move |req| {
                    handle(
                        req,
                        name.clone(),
                        behavior.clone(),
                        hits.clone(),
                        probes.clone(),
                        seen.clone(),
                    )
                });
                _conns.lock().unwrap().spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        self.tasks = Some(tasks);
    }

    /// Closes the listening socket and every open connection.
    pub async fn stop(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.shutdown().await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.spawn(listener);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(SeqCst)
    }

    pub fn probes(&self) -> usize {
        self.probes.load(SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn set_status(&self, status: u16) {
        self.behavior.status.store(status, SeqCst);
    }

    pub fn set_health(&self, status: u16) {
        self.behavior.health_status.store(status, SeqCst);
    }

    pub fn set_delay(&self, d: Duration) {
        self.behavior.delay_ms.store(d.as_millis() as u64, SeqCst);
    }

    pub fn set_reset(&self, on: bool) {
        self.behavior.reset.store(on, SeqCst);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(tasks) = self.tasks.as_mut() {
            tasks.abort_all();
        }
    }
}

/// An error type whose failure makes hyper close the connection: a "reset".
#[derive(Debug)]
struct Reset;
impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset by test backend")
    }
}
impl std::error::Error for Reset {}

async fn handle(
    req: Request<Incoming>,
    name: String,
    b: Arc<Behavior>,
    hits: Arc<AtomicUsize>,
    probes: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, Reset> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if parts.uri.path() == "/health" {
        probes.fetch_add(1, SeqCst);
        let status = b.health_status.load(SeqCst);
        let status = if status == 0 { 200 } else { status };
        return Ok(reply(status, format!("{name} health\n").into(), &name));
    }
    let n = hits.fetch_add(1, SeqCst);
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        target: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let only_first = b.only_first.load(SeqCst);
    let misbehave = only_first == 0 || n < only_first;
    let delay = b.delay_ms.load(SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if misbehave && b.reset.load(SeqCst) {
        return Err(Reset);
    }
    let status = b.status.load(SeqCst);
    if misbehave && status != 0 {
        return Ok(reply(
            status,
            format!("{name} says {status}\n").into(),
            &name,
        ));
    }
    match parts.uri.path() {
        "/echo" => Ok(reply(200, body, &name)),
        "/headers" => {
            let mut text = String::new();
            for (k, v) in &parts.headers {
                text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
            }
            Ok(reply(200, text.into(), &name))
        }
        _ => Ok(reply(200, name.clone().into(), &name)),
    }
}

fn reply(status: u16, body: Bytes, name: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("x-backend", name)
        .header("connection", "x-hop")
        .header("x-hop", "must be stripped")
        .body(Full::new(body))
        .unwrap()
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1.1 client.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Answer {
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(client: &TestClient, url: &str) -> Answer {
    send(client, Request::get(url).body(Full::default()).unwrap()).await
}

/// lb running in-process on an ephemeral port, its config in a temp dir.
pub struct TestLb {
    pub lb: lb::Lb,
    pub dir: tempfile::TempDir,
    /// The config file lb watches.
    pub path: PathBuf,
}

/// The `backends:` list for `backends`, each with weight 1.
pub fn backends_yaml(backends: &[&Backend]) -> String {
    let mut s = String::from("backends:\n");
    for b in backends {
        s.push_str(&format!("  - address: {}\n", b.addr));
    }
    s
}

impl TestLb {
    /// Starts lb with `yaml` (which should not set `listen`: the harness
    /// adds `listen: 127.0.0.1:0`). Watching is on, polling every 200 ms.
    pub async fn start(yaml: &str) -> TestLb {
        Self::start_with(yaml, true).await
    }

    pub async fn start_with(yaml: &str, watch: bool) -> TestLb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let yaml = with_listen(yaml);
        std::fs::write(&path, &yaml).unwrap();
        let (config, hash) = lb::config::Config::load(&path).unwrap();
        let listener = lb::net::listen::bind(config.listen()).unwrap();
        let settings = settings(
            &path,
            lb::reload::WatchSettings {
                watch,
                poll_interval: Duration::from_millis(200),
            },
        );
        let lb = lb::Lb::start(listener, config, hash, settings).unwrap();
        TestLb { lb, dir, path }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.lb.local_addr(), path)
    }

    /// Replaces the config atomically (write temp + rename), keeping `listen: 127.0.0.1:0`.
    pub fn rewrite(&self, yaml: &str) {
        let tmp = self.dir.path().join(".config.yaml.tmp");
        std::fs::write(&tmp, with_listen(yaml)).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    /// Configs applied so far (1 after start).
    pub fn applied(&self) -> u64 {
        self.lb.runtime().reloads.applied.load(SeqCst)
    }

    pub fn rejected(&self) -> u64 {
        self.lb.runtime().reloads.rejected.load(SeqCst)
    }
}

/// No backend of `lb`'s first pool has a failure on record or is held
/// out: nothing was blamed on them.
pub fn nobody_blamed(lb: &TestLb) {
    let snap = lb.lb.runtime().snapshot();
    let now = lb.lb.runtime().clock.now_ms();
    for b in &snap.first_pool().backends {
        assert_eq!(b.state.failures(), 0, "{} was blamed", b.addr);
        assert!(b.state.is_available(now), "{} was ejected", b.addr);
    }
}

/// Settings for an in-process lb: two workers (so state shared between
/// workers is exercised), and the HTTP/1 path named by `TEST_LB_HTTP1`
/// (`fast`, the default, or `hyper`): CI runs the suite once with each.
pub fn settings(path: &Path, watch: lb::reload::WatchSettings) -> lb::Settings {
    let mut s = lb::Settings::new(path.to_owned(), watch);
    s.workers = std::num::NonZeroUsize::new(2).unwrap();
    s.http1 = http1_under_test();
    s
}

/// The HTTP/1 path this run of the suite tests (`TEST_LB_HTTP1`).
pub fn http1_under_test() -> lb::http::server::Http1 {
    match std::env::var("TEST_LB_HTTP1").as_deref() {
        Ok("hyper") => lb::http::server::Http1::Hyper,
        Ok("fast") | Err(_) => lb::http::server::Http1::Fast,
        Ok(other) => panic!("TEST_LB_HTTP1={other}: want fast or hyper"),
    }
}

fn with_listen(yaml: &str) -> String {
    if yaml.contains("listen:") {
        yaml.to_owned()
    } else {
        format!("listen: 127.0.0.1:0\n{yaml}")
    }
}

/// The real `lb` binary, with its stderr collected line by line.
pub struct LbProcess {
    pub child: Child,
    /// Every stderr line so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl LbProcess {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> LbProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lb"));
        cmd.args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        LbProcess { child, log }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The address from the latest "listening on ADDR" line.
    pub fn listening(&self) -> Option<SocketAddr> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|l| l.split("listening on ").nth(1)?.trim().parse().ok())
    }

    /// Waits for the first "listening on" line.
    pub async fn wait_listening(&self) -> SocketAddr {
        eventually!(
            10,
            self.listening().is_some(),
            "lb never listened: {}",
            self.log_text()
        );
        self.listening().unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `yaml` to `dir/config.yaml` and returns its path.
pub fn write_config(dir: &Path, yaml: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A raw TCP server on an ephemeral 127.0.0.1 port: `handle` gets every
/// accepted connection, each on its own task.
pub async fn raw_server<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            if let Ok((s, _)) = l.accept().await {
                tokio::spawn(handle(s));
            }
        }
    });
    addr
}

/// Writes `n` filler bytes (`x`) to `s`, 64 KiB at a time, as the socket
/// takes them: a large response body from a raw backend.
pub async fn write_filler(s: &mut tokio::net::TcpStream, n: u64) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let piece = vec![b'x'; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(piece.len() as u64) as usize;
        s.write_all(&piece[..k]).await?;
        left -= k as u64;
    }
    Ok(())
}

/// Infallible helper for services in tests.
pub fn ok<T>(t: T) -> Result<T, Infallible> {
    Ok(t)
}

/// A TCP echo backend on 127.0.0.1, for tcp mode: echoes every byte, and
/// when the client half-closes, writes its name and closes. The name after
/// the echo says which backend served a connection, and proves the client's
/// FIN reached it while the response could still flow.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub name: String,
    /// Connections accepted, health probes included.
    accepted: Arc<AtomicUsize>,
    /// Connections not yet ended.
    open: Arc<AtomicUsize>,
    /// Listener and all its connections; aborting them frees the port.
    tasks: Option<JoinSet<()>>,
}

impl EchoBackend {
    pub async fn start(name: &str) -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut b = EchoBackend {
            addr: listener.local_addr().unwrap(),
            name: name.to_owned(),
            accepted: Arc::default(),
            open: Arc::default(),
            tasks: None,
        };
        b.spawn(listener);
        b
    }

    fn spawn(&mut self, listener: TcpListener) {
        let (name, accepted, open) = (self.name.clone(), self.accepted.clone(), self.open.clone());
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            // Aborting this task drops the set, which aborts every connection.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, SeqCst);
                open.fetch_add(1, SeqCst);
                let (name, open) = (name.clone(), open.clone());
                conns.spawn(async move {
                    echo(stream, &name).await;
                    open.fetch_sub(1, SeqCst);
                });
                while conns.try_join_next().is_some() {}
            }
        });
        self.tasks = Some(tasks);
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(SeqCst)
    }

    /// Closes the listening socket (connects are refused) and every connection.
    pub async fn stop(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.shutdown().await;
        }
        self.open.store(0, SeqCst);
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.spawn(listener);
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        if let Some(tasks) = self.tasks.as_mut() {
            tasks.abort_all();
        }
    }
}

async fn echo(mut stream: tokio::net::TcpStream, name: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => {
                let _ = stream.write_all(name.as_bytes()).await;
                let _ = stream.shutdown().await;
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Makes a FIFO (named pipe) at `path`, for tests of what lb refuses to read.
pub fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}
