//! A mock backend for trying out `lb`: one process serving several ports,
//! each of which you can stop, slow down or break from an interactive prompt.
//!
//! ```text
//! cargo run --example backend -- 9001 9002 9003            # listen on 127.0.0.1
//! cargo run --example backend -- --host 0.0.0.0 9001 9002  # or on another address
//! ```
//!
//! Every port speaks HTTP/1.1 and cleartext HTTP/2. Any path answers `200`
//! with a body such as `backend 9001: GET /some/path` and an `x-backend: 9001`
//! header. The request body is read to the end and its length reported.
//! `/health` answers `200 ok`. `/protocol` answers `200` with the HTTP
//! version the request arrived in (`HTTP/1.1`, `HTTP/2.0`): what a proxy in
//! front of it speaks to its backends.
//!
//! Commands typed at the `> ` prompt (`PORT` is a port number or `all`):
//!
//! - `stop PORT` closes the listening socket and cuts every open connection.
//! - `start PORT` listens again. A port that was never started is added.
//! - `slow PORT 500ms` delays every response (`ms` or `s` suffix; `0` clears).
//! - `fail PORT 503` answers every request with that status, `/health` included.
//! - `sick PORT` makes only `/health` answer 503, so health checks fail.
//! - `ok PORT` clears slow, fail and sick.
//! - `status` prints one line per port; `help` prints the commands, `quit` exits.
//!
//! When stdin is closed (for example when run in the background), the
//! backend keeps serving until it is killed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const HELP: &str = "\
commands (PORT is a port number or `all`):
  stop PORT         close the port and cut its open connections
  start PORT        listen again (or add a new port)
  slow PORT 500ms   delay every response (500ms or 2s; 0 clears)
  fail PORT 503     answer every request with this status
  sick PORT         /health answers 503, other paths still 200
  ok PORT           clear slow, fail and sick
  status            show every port
  help | quit";

#[derive(Parser)]
#[command(about = "Mock HTTP backends for trying out lb")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Ports to serve.
    #[arg(value_parser = clap::value_parser!(u16).range(1..))]
    #[arg(default_values_t = [9001, 9002, 9003])]
    ports: Vec<u16>,
}

/// Knobs and counters for one port, shared by the prompt and that port's connections.
#[derive(Default)]
struct PortState {
    port: u16,
    delay_ms: AtomicU64,
    fail_status: AtomicU16, // 0 means "not failing"
    sick: AtomicBool,
    requests: AtomicU64,
    health_checks: AtomicU64,
}

/// A port known to the prompt: its state, plus its accept loop while listening.
struct Backend {
    state: Arc<PortState>,
    server: Option<JoinHandle<()>>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut backends = BTreeMap::new();
    for port in args.ports {
        start(&mut backends, args.host, port).await;
    }
    println!("{HELP}");

    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    loop {
        print!("> ");
        let _ = std::io::stdout().flush();
        line.clear();
        match stdin.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => {
                println!("\nstdin closed; still serving until killed (Ctrl-C)");
                return std::future::pending().await;
            }
            Ok(_) => {
                let line = String::from_utf8_lossy(&line);
                if let Err(e) = command(&line, &mut backends, args.host).await {
                    println!("error: {e}");
                }
            }
        }
    }
}

/// Runs one line typed at the prompt.
async fn command(
    line: &str,
    backends: &mut BTreeMap<u16, Backend>,
    host: IpAddr,
) -> Result<(), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [] => {}
        ["help"] => println!("{HELP}"),
        ["quit"] | ["exit"] => std::process::exit(0),
        ["status"] => backends.values().for_each(print_status),
        ["start", ports] => {
            for port in parse_ports(backends, ports)? {
                start(backends, host, port).await;
            }
        }
        ["stop", ports] => {
            for port in parse_ports(backends, ports)? {
                let backend = backends
                    .get_mut(&port)
                    .ok_or(format!("unknown port {port}"))?;
                stop(backend).await;
            }
        }
        ["slow", ports, delay] => {
            let ms = parse_delay(delay)?;
            update(backends, ports, |s| s.delay_ms.store(ms, Relaxed))?;
        }
        ["fail", ports, status] => {
            let status = match status.parse::<u16>() {
                Ok(code @ 200..=599) => code,
                _ => return Err(format!("bad status {status:?} (expected 200-599)")),
            };
            update(backends, ports, |s| s.fail_status.store(status, Relaxed))?;
        }
        ["sick", ports] => update(backends, ports, |s| s.sick.store(true, Relaxed))?,
        ["ok", ports] => update(backends, ports, |s| {
            s.delay_ms.store(0, Relaxed);
            s.fail_status.store(0, Relaxed);
            s.sick.store(false, Relaxed);
        })?,
        _ => return Err(format!("unknown command {:?}; type help", line.trim())),
    }
    Ok(())
}

/// `all` means every known port; otherwise one port number.
fn parse_ports(backends: &BTreeMap<u16, Backend>, arg: &str) -> Result<Vec<u16>, String> {
    if arg == "all" {
        return Ok(backends.keys().copied().collect());
    }
    match arg.parse::<u16>() {
        Ok(port) if port > 0 => Ok(vec![port]),
        _ => Err(format!("bad port {arg:?} (expected 1-65535 or all)")),
    }
}

/// Parses `500ms`, `2s` or `0` into milliseconds.
fn parse_delay(arg: &str) -> Result<u64, String> {
    let ms = match (arg.strip_suffix("ms"), arg.strip_suffix('s')) {
        (Some(ms), _) => ms.parse().ok(),
        (None, Some(secs)) => secs.parse::<u64>().ok().and_then(|s| s.checked_mul(1000)),
        (None, None) => (arg == "0").then_some(0),
    };
    ms.ok_or(format!("bad delay {arg:?} (try 500ms, 2s or 0)"))
}

/// Applies `change` to the given ports, then shows their new status.
fn update(
    backends: &BTreeMap<u16, Backend>,
    ports: &str,
    change: impl Fn(&PortState),
) -> Result<(), String> {
    for port in parse_ports(backends, ports)? {
        let backend = backends.get(&port).ok_or(format!("unknown port {port}"))?;
        change(&backend.state);
        print_status(backend);
    }
    Ok(())
}

fn print_status(backend: &Backend) {
    let s = &backend.state;
    let (delay, fail) = (s.delay_ms.load(Relaxed), s.fail_status.load(Relaxed));
    let mut mode = Vec::new();
    if delay > 0 {
        mode.push(format!("slow {delay}ms"));
    }
    if fail > 0 {
        mode.push(format!("fail {fail}"));
    }
    if s.sick.load(Relaxed) {
        mode.push("sick".to_string());
    }
    let mode = if mode.is_empty() {
        "ok".to_string()
    } else {
        mode.join(", ")
    };
    let listening = match backend.server {
        Some(_) => "listening",
        None => "stopped",
    };
    let (requests, health_checks) = (s.requests.load(Relaxed), s.health_checks.load(Relaxed));
    println!(
        "{:>5}  {listening:<9}  {mode:<22}  {requests} requests, {health_checks} health checks",
        s.port
    );
}

/// Binds the port (adding it if new) and spawns its accept loop.
async fn start(backends: &mut BTreeMap<u16, Backend>, host: IpAddr, port: u16) {
    let backend = backends.entry(port).or_insert_with(|| Backend {
        state: Arc::new(PortState {
            port,
            ..Default::default()
        }),
        server: None,
    });
    if backend.server.is_some() {
        println!("port {port} is already listening");
        return;
    }
    let addr = SocketAddr::new(host, port);
    match TcpListener::bind(addr).await {
        Ok(listener) => {
            println!("backend listening on {addr}");
            backend.server = Some(tokio::spawn(serve(listener, backend.state.clone())));
        }
        Err(e) => println!("error: cannot listen on {addr}: {e}"),
    }
}

/// Aborts the accept loop and waits until it is gone: by then its listener is
/// closed (the port is free) and its connections have been told to abort.
async fn stop(backend: &mut Backend) {
    match backend.server.take() {
        Some(task) => {
            task.abort();
            let _ = task.await;
            println!("backend {} stopped", backend.state.port);
        }
        None => println!("port {} is already stopped", backend.state.port),
    }
}

/// Accepts connections forever. Each one runs in `connections`, so when this
/// task is aborted, dropping the `JoinSet` aborts every open connection too.
async fn serve(listener: TcpListener, state: Arc<PortState>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, state.clone()));
                }
                Err(e) => {
                    eprintln!("backend {}: accept failed: {e}", state.port);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next() => {} // forget finished connections
        }
    }
}

/// Serves one connection, HTTP/1.1 or HTTP/2 (whichever the client speaks).
async fn serve_connection(stream: TcpStream, state: Arc<PortState>) {
    let service = service_fn(move |request| respond(request, state.clone()));
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn respond(
    request: Request<Incoming>,
    state: Arc<PortState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().clone();
    let version = request.version();
    let path = request.uri().path().to_string();
    let health = path == "/health";
    let counter = if health {
        &state.health_checks
    } else {
        &state.requests
    };
    counter.fetch_add(1, Relaxed);

    // Drain the body, counting its bytes without keeping them.
    let mut body = request.into_body();
    let mut body_len = 0;
    while let Some(Ok(frame)) = body.frame().await {
        body_len += frame.data_ref().map_or(0, |data| data.len());
    }

    let delay = state.delay_ms.load(Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    let port = state.port;
    let fail = StatusCode::from_u16(state.fail_status.load(Relaxed)).ok();
    let (status, text) = match fail {
        Some(status) => (status, format!("backend {port}: failing with {status}\n")),
        None if health && state.sick.load(Relaxed) => {
            (StatusCode::SERVICE_UNAVAILABLE, "sick\n".to_string())
        }
        None if health => (StatusCode::OK, "ok\n".to_string()),
        None if path == "/protocol" => (StatusCode::OK, format!("{version:?}\n")),
        None if body_len > 0 => (
            StatusCode::OK,
            format!("backend {port}: {method} {path} ({body_len} bytes)\n"),
        ),
        None => (StatusCode::OK, format!("backend {port}: {method} {path}\n")),
    };

    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("x-backend", HeaderValue::from(port));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}
