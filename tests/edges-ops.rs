//! Operating lb on a bad day (issue 20): a stderr or stdout nobody reads
//! never stops serving nor shutdown, and lb's own fd limit is never blamed
//! on a backend. Each test runs the real binary, whose pipes and limits the
//! test controls.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// How the test wires the child's pipes and limits.
#[derive(Default)]
struct Spawn<'a> {
    args: &'a [&'a str],
    /// Stop reading stderr once lb listens (the pipe stays open, unread).
    stop_reading_stderr: bool,
    /// Give lb a stdout pipe that is never read.
    unread_stdout: bool,
    /// RLIMIT_NOFILE for the child.
    nofile: Option<u64>,
}

/// The real lb with the pipes the test chose.
struct Proc {
    child: Child,
    /// stderr lines read so far (all of them unless reading stopped).
    log: Arc<Mutex<Vec<String>>>,
    listen: SocketAddr,
    admin: SocketAddr,
    /// Pipe ends held open and never read.
    _stderr: Option<BufReader<ChildStderr>>,
    _stdout: Option<ChildStdout>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--http1` for the path this run of the suite tests.
fn http1_arg() -> &'static str {
    match http1_under_test() {
        lb::http::server::Http1::Fast => "fast",
        lb::http::server::Http1::Hyper => "hyper",
    }
}

fn address_after(lines: &[String], marker: &str) -> Option<SocketAddr> {
    lines
        .iter()
        .find_map(|l| l.split(marker).nth(1)?.trim().parse().ok())
}

fn spawn(config: &Path, how: Spawn<'_>) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lb"));
    cmd.arg("--config")
        .arg(config)
        .args(["--http1", http1_arg()])
        .args(how.args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(if how.unread_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
    if let Some(limit) = how.nofile {
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(move || {
                let rlim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = mpsc::channel();
    let (lines, stop) = (Arc::clone(&log), how.stop_reading_stderr);
    std::thread::spawn(move || {
        let mut line = String::new();
        let mut ready = false;
        while matches!(stderr.read_line(&mut line), Ok(n) if n > 0) {
            let mut lines = lines.lock().unwrap();
            lines.push(line.trim_end().to_owned());
            line.clear();
            let up = address_after(&lines, "listening on ").is_some()
                && address_after(&lines, "admin listener on ").is_some();
            drop(lines);
            if up && !ready {
                ready = true;
                if stop {
                    // Hand the pipe back unread: from now on nobody reads it.
                    let _ = ready_tx.send(Some(stderr));
                    return;
                }
                let _ = ready_tx.send(None);
            }
        }
    });
    let held = ready_rx
        .recv_timeout(Duration::from_secs(WAIT))
        .unwrap_or_else(|_| panic!("lb never listened: {}", log.lock().unwrap().join("\n")));
    let lines = log.lock().unwrap().clone();
    Proc {
        child,
        listen: address_after(&lines, "listening on ").unwrap(),
        admin: address_after(&lines, "admin listener on ").unwrap(),
        log,
        _stderr: held,
        _stdout: stdout,
    }
}

impl Proc {
    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGTERM, then how long lb took to exit (panics past `bound`).
    async fn terminate_within(&mut self, bound: Duration) -> Duration {
        let asked = Instant::now();
        self.signal("TERM");
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "lb exited with {status}");
                return asked.elapsed();
            }
            assert!(
                asked.elapsed() < bound,
                "lb still running {bound:?} after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A GET bounded by `limit`: `None` when no answer came in time.
async fn get_within(client: &TestClient, url: &str, limit: Duration) -> Option<Answer> {
    tokio::time::timeout(limit, async {
        let resp = client.get(url.parse().unwrap()).await.ok()?;
        let (parts, body) = resp.into_parts();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .ok()?
            .to_bytes();
        Some(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    })
    .await
    .ok()
    .flatten()
}

/// The sum of the series of metric `name` whose labels contain every one
/// of `labels` (`backend="…"`), in an OpenMetrics text.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
                && labels.iter().all(|want| l.contains(want))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape(client: &TestClient, admin: SocketAddr) -> String {
    let answer = get_within(
        client,
        &format!("http://{admin}/metrics"),
        Duration::from_secs(10),
    )
    .await
    .expect("/metrics did not answer");
    answer.text()
}

/// A 127.0.0.1 port nothing listens on: connects are refused.
fn dead_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Sends GETs to `url` from `clients` concurrent keep-alive clients until
/// `stop`; counts answers by status class.
fn load(
    url: String,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<tokio::task::JoinHandle<()>>, Arc<[AtomicU64; 6]>) {
    let counts: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let tasks = (0..clients)
        .map(|_| {
            let (url, stop, counts) = (url.clone(), Arc::clone(&stop), Arc::clone(&counts));
            tokio::spawn(async move {
                let client = client();
                while !stop.load(SeqCst) {
                    match get_within(&client, &url, Duration::from_secs(10)).await {
                        Some(a) => {
                            counts[usize::from(a.status.as_u16() / 100)].fetch_add(1, SeqCst)
                        }
                        None => counts[0].fetch_add(1, SeqCst),
                    };
                }
            })
        })
        .collect();
    (tasks, counts)
}

/// Issue 20 item 2: logging wrote stderr synchronously from the serving
/// threads; with a pipe nobody reads, the worker that logged blocked in
/// `write`, and with it `/healthz`, requests and SIGTERM. Now lines queue
/// for a writer thread, and a full queue drops (and counts) them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_nobody_reads_never_stops_serving_nor_shutdown() {
    let backend = Backend::start("alive").await;
    let dir = tempfile::tempdir().unwrap();
    // Four dead backends and retries that always may: every request logs
    // its failed attempts (debug) and still succeeds on the live one.
    let mut yaml = String::from("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nbackends:\n");
    for _ in 0..4 {
        yaml.push_str(&format!("  - address: {}\n", dead_address()));
    }
    yaml.push_str(&format!(
        "  - address: {}\noutlier_detection:\n  consecutive_failures: 0\n\
         retry:\n  attempts: 5\n  budget:\n    min_retries_per_second: 1000000\n",
        backend.addr
    ));
    let config = write_config(dir.path(), &yaml);
    let args = [
        "--log-level",
        "debug",
        "--workers",
        "2",
        "--shutdown-grace",
        "2s",
    ];
    let mut lb = spawn(
        &config,
        Spawn {
            args: &args,
            stop_reading_stderr: true,
            ..Spawn::default()
        },
    );
    let admin = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (tasks, counts) = load(format!("http://{}/", lb.listen), 16, Arc::clone(&stop));
    // Far past the pipe's 64 KiB and the log's queue: until lines drop.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let healthz = get_within(
            &admin,
            &format!("http://{}/healthz", lb.admin),
            Duration::from_secs(10),
        )
        .await;
        assert!(
            healthz.is_some_and(|a| a.status == 200),
            "/healthz stopped answering with stderr unread"
        );
        let dropped = metric(
            &scrape(&admin, lb.admin).await,
            "lb_log_lines_dropped_total",
            &[],
        );
        if dropped > 0.0 {
            break;
        }
        assert_eq!(
            counts[0].load(SeqCst),
            0,
            "requests went unanswered with stderr unread"
        );
        assert!(
            Instant::now() < deadline,
            "no log line dropped after {} requests",
            counts[2].load(SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still serving, with lines dropping.
    let served_before = counts[2].load(SeqCst);
    eventually!(WAIT, counts[2].load(SeqCst) > served_before + 100);
    stop.store(true, SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let by_class: Vec<u64> = counts.iter().map(|n| n.load(SeqCst)).collect();
    assert_eq!(
        by_class[0] + by_class[5],
        0,
        "requests failed or went unanswered (by class: {by_class:?})"
    );
    let text = scrape(&admin, lb.admin).await;
    assert!(metric(&text, "lb_log_lines_dropped_total", &[]) > 0.0);
    // delay 0 + grace 2 s + the bounded flushes; generous for a loaded machine.
    let took = lb.terminate_within(Duration::from_secs(15)).await;
    eprintln!("stderr unread: {by_class:?} by status class; SIGTERM took {took:?}");
}

/// Issue 20 item 3: `AccessLog::flush` sent its request with a blocking
/// send on the full queue, so with stdout a pipe nobody reads SIGTERM never
/// completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_log_nobody_reads_does_not_hold_shutdown() {
    let backend = Backend::start("alive").await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\naccess_log: true\nbackends:\n  - address: {}\n",
            backend.addr
        ),
    );
    let mut lb = spawn(
        &config,
        Spawn {
            args: &["--shutdown-grace", "2s", "--workers", "2"],
            unread_stdout: true,
            ..Spawn::default()
        },
    );
    let admin = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (tasks, counts) = load(format!("http://{}/", lb.listen), 16, Arc::clone(&stop));
    // Until the queue is full (lines drop): the pipe and the queue hold no more.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = scrape(&admin, lb.admin).await;
        if metric(&text, "lb_access_log_dropped_total", &[]) > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no access log line dropped after {} requests",
            counts[2].load(SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let served = counts[2].load(SeqCst);
    assert_eq!(counts[0].load(SeqCst), 0, "requests went unanswered");
    // grace 2 s + 0.5 s (+ 1 s for last frames) promised; generous for a
    // loaded machine, far below "never".
    let took = lb.terminate_within(Duration::from_secs(12)).await;
    eprintln!("stdout unread: {served} requests served; SIGTERM took {took:?}");
    eventually!(
        WAIT,
        lb.log_text().contains("access log not flushed"),
        "{}",
        lb.log_text()
    );
}

/// What a raw client read: the status and body of one response, if any
/// came within the wait (a connection lb never accepted gets none).
async fn one_response(stream: &mut tokio::net::TcpStream, wait: Duration) -> Option<(u16, String)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    let status = head.split(' ').nth(1)?.parse().ok()?;
                    let body =
                        String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
                    return Some((status, body));
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

/// Issue 20 item 5: at lb's own fd limit a backend connect fails with
/// EMFILE; it was counted as the backend's `connect_failure` and a healthy
/// backend was ejected, and the config poll's failed read was a "rejected"
/// reload. Now clients get 503, no backend is charged, nothing is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lbs_own_fd_limit_is_never_blamed_on_a_backend() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start("alive").await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nbackends:\n  - address: {}\n",
            backend.addr
        ),
    );
    let lb = spawn(
        &config,
        Spawn {
            args: &["--workers", "1", "--poll-interval", "50ms"],
            nofile: Some(64),
            ..Spawn::default()
        },
    );
    // More clients than lb has descriptors, each asking at once and
    // holding its connection open (keep-alive) afterwards.
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(lb.listen).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
            .await
            .unwrap();
        clients.push(s);
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let answer = one_response(&mut s, Duration::from_secs(5)).await;
                (s, answer)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut answers = Vec::new();
    for r in readers {
        let (s, answer) = r.await.unwrap();
        held.push(s);
        answers.extend(answer);
    }
    // Still at the limit: the config poll cannot open the file either.
    eventually!(
        WAIT,
        lb.log_text().contains("op=\"config_read\"") || lb.log_text().contains("op=config_read"),
        "no config read hit the limit: {}",
        lb.log_text()
    );
    drop(held);
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "a client got something else than 200 or 503: {statuses:?}"
    );
    let exhausted = answers.iter().filter(|(s, _)| *s == 503).count();
    assert!(exhausted > 0, "no request hit the limit: {statuses:?}");
    assert!(
        answers
            .iter()
            .filter(|(s, _)| *s == 503)
            .all(|(_, body)| body == lb::obs::local::EXHAUSTED_BODY),
        "{answers:?}"
    );
    // The descriptors are back: the admin listener answers again.
    let admin = client();
    let text = scrape(&admin, lb.admin).await;
    assert_not_charged(&text, backend.addr);
    assert!(
        metric(
            &text,
            "lb_local_errors_total",
            &["op=\"connect\"", "kind=\"fd_limit\""]
        ) > 0.0,
        "{text}"
    );
    assert!(
        metric(&text, "lb_local_errors_total", &["op=\"accept\""]) > 0.0,
        "{text}"
    );
    assert!(
        metric(&text, "lb_local_errors_total", &["op=\"config_read\""]) > 0.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "lb_config_last_reload_successful", &[]),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "lb_config_reloads_total", &["result=\"failure\""]),
        0.0,
        "{text}"
    );
    assert!(!lb.log_text().contains("rejected"), "{}", lb.log_text());
    assert!(!lb.log_text().contains("is down"), "{}", lb.log_text());
    // And it serves as before, once the held connections' descriptors are
    // all closed (lb closes them as it notices the clients left; until then
    // a request may still meet the limit, and must get lb's 503 for it).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = get_within(
            &admin,
            &format!("http://{}/", lb.listen),
            Duration::from_secs(10),
        )
        .await
        .expect("lb answers once the clients are gone");
        if answer.status == hyper::StatusCode::OK {
            break;
        }
        assert_eq!(answer.status, hyper::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.body, lb::obs::local::EXHAUSTED_BODY);
        assert!(
            Instant::now() < deadline,
            "lb never served again after the clients left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "fd limit 64, 100 clients: {} answered ({exhausted} × 503), local errors: {}",
        answers.len(),
        text.lines()
            .filter(|l| l.starts_with("lb_local_errors_total"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// Issue 20 item 5, tcp mode: a connection whose backend connect fails on
/// lb's fd limit is closed without charging the backend.
///
/// Whether the last free descriptor goes to an accept (then the connect
/// fails: the case under test) or no accept gets one at all depends on how
/// many descriptors lb holds at rest, which the environment moves (CI's
/// harness hands lb one fewer than a terminal does, and at limit 64 there no
/// connect ever failed). Three neighbouring limits make the case happen
/// under at least one of them wherever the test runs; measured here, 63, 64,
/// 66, 67 and 68 each show it and 65 does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_at_lbs_fd_limit_charges_no_backend() {
    let backend = EchoBackend::start("echo").await;
    let mut tried = Vec::new();
    for limit in [64, 65, 66] {
        let (echoed, closed, text) = fill_tcp_lb_to_its_fd_limit(backend.addr, limit).await;
        tried.push(format!("limit {limit}: {echoed} echoed, {closed} closed"));
        assert_not_charged(&text, backend.addr);
        if closed > 0 {
            assert!(
                metric(&text, "lb_local_errors_total", &["op=\"connect\""]) > 0.0,
                "{text}"
            );
            eprintln!("tcp mode, fd limit {limit}, 100 clients: {echoed} echoed, {closed} closed at the limit");
            return;
        }
    }
    panic!("no connection hit the limit: {}", tried.join("; "));
}

/// Runs a tcp-mode lb with `limit` descriptors, opens 100 clients to it and
/// returns how many got their echo, how many were closed, and its metrics.
async fn fill_tcp_lb_to_its_fd_limit(
    backend: std::net::SocketAddr,
    limit: u64,
) -> (usize, usize, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nmode: tcp\nbackends:\n  - address: {backend}\n"
        ),
    );
    let lb = spawn(
        &config,
        Spawn {
            args: &["--workers", "1"],
            nofile: Some(limit),
            ..Spawn::default()
        },
    );
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(lb.listen).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        clients.push(s);
    }
    // Each accepted client gets its echo (connected) or an end (closed at
    // the limit); one never accepted gets neither within the wait.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
                (s, got.ok().map(|r| r.map_or(0, |n| n)))
            })
        })
        .collect();
    let mut held = Vec::new();
    let (mut echoed, mut closed) = (0, 0);
    for r in readers {
        let (s, got) = r.await.unwrap();
        match got {
            Some(0) => closed += 1,
            Some(_) => echoed += 1,
            None => {}
        }
        held.push(s);
    }
    drop(held);
    let text = scrape(&client(), lb.admin).await;
    (echoed, closed, text)
}

/// Issue 20 item 10: admin on `0.0.0.0:P` beside listen `127.0.0.1:P`
/// failed at bind time with "another lb?"; the clash is lb's own, and the
/// message now says which two addresses clash, before anything is bound.
#[test]
fn admin_on_the_wildcard_of_the_listen_port_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "listen: 127.0.0.1:18080\nadmin: 0.0.0.0:18080\nbackends:\n  - address: 127.0.0.1:9001\n",
    );
    for args in [vec!["--check"], vec![]] {
        let out = Command::new(env!("CARGO_BIN_EXE_lb"))
            .arg("--config")
            .arg(&config)
            .args(&args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(
                "admin: admin 0.0.0.0:18080 overlaps listen 127.0.0.1:18080 (the same port, and admin is on the wildcard address)"
            ) && !stderr.contains("another lb"),
            "{args:?}: {stderr}"
        );
    }
}

/// The scrape shows `backend` never charged for lb's own shortage: no
/// connect failure, no ejection, still healthy.
fn assert_not_charged(text: &str, backend: std::net::SocketAddr) {
    let addr = format!("backend=\"{backend}\"");
    assert_eq!(
        metric(
            text,
            "lb_upstream_attempts_total",
            &[&addr, "outcome=\"connect_failure\""]
        ),
        0.0,
        "the backend was charged for lb's fd limit:\n{text}"
    );
    assert_eq!(metric(text, "lb_outlier_ejections_total", &[&addr]), 0.0);
    assert_eq!(metric(text, "lb_backend_healthy", &[&addr]), 1.0);
}
