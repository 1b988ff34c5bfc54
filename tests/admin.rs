//! The admin listener (issue 8): `/metrics` scraped and parsed as the
//! exposition format, `/status`, `/healthz`, `/readyz` through a real
//! SIGTERM with `--shutdown-delay`, `POST /reload`, the listener moved and
//! closed by reloads, and the access log in text and JSON.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use tokio::time::Instant;

/// One sample: metric name and its labels, sorted.
type Series = (String, BTreeMap<String, String>);

/// Parses the Prometheus/OpenMetrics text format: `# HELP`/`# TYPE`/`# EOF`
/// lines, then `name{k="v",…} value` samples with escaped label values.
fn parse_metrics(text: &str) -> BTreeMap<Series, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = line[..name_end].to_owned();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices().peekable();
            let end;
            loop {
                // key
                let mut key = String::new();
                let (_, c) = chars.next().expect("unterminated labels");
                if c == '}' {
                    end = 1;
                    break;
                }
                key.push(c);
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "in {line:?}");
                let mut value = String::new();
                loop {
                    match chars.next().expect("unterminated label value") {
                        (_, '\\') => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(c) => value.push(c),
                            None => panic!("dangling escape in {line:?}"),
                        },
                        (_, '"') => break,
                        (_, c) => value.push(c),
                    }
                }
                labels.insert(key.trim().to_owned(), value);
                match chars.next().expect("unterminated labels") {
                    (_, ',') => {
                        if chars.peek().map(|(_, c)| *c) == Some('}') {
                            let (i, _) = chars.next().unwrap();
                            end = i + 1;
                            break;
                        }
                    }
                    (i, '}') => {
                        end = i + 1;
                        break;
                    }
                    (_, c) => panic!("unexpected {c:?} in {line:?}"),
                }
            }
            rest = &after[end..];
        }
        let value_text = rest.split_whitespace().next().expect("no value");
        let value: f64 = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        assert!(
            out.insert((name, labels), value).is_none(),
            "duplicate series in {line:?}"
        );
    }
    out
}

/// A scrape, parsed.
struct Scrape(BTreeMap<Series, f64>);

impl Scrape {
    /// Sum over every series of `name` whose labels include `with`.
    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|((n, labels), _)| {
                n == name
                    && with
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Whether any series of any name has `label=value`.
    fn mentions(&self, label: &str, value: &str) -> bool {
        self.0
            .keys()
            .any(|(_, labels)| labels.get(label).map(String::as_str) == Some(value))
    }

    /// The one series of `name` whose labels include `with` (`None` if
    /// there is none; more than one is a test bug).
    fn get(&self, name: &str, with: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.0.iter().filter(|((n, labels), _)| {
            n == name
                && with
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        });
        let first = found.next().map(|(_, v)| *v);
        assert!(
            found.next().is_none(),
            "{name} {with:?} names several series"
        );
        first
    }
}

async fn scrape(c: &TestClient, admin: std::net::SocketAddr) -> Scrape {
    let a = get(c, &format!("http://{admin}/metrics")).await;
    assert_eq!(a.status, StatusCode::OK);
    let text = a.text();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    Scrape(parse_metrics(&text))
}

async fn status_json(c: &TestClient, admin: std::net::SocketAddr) -> serde_json::Value {
    let a = get(c, &format!("http://{admin}/status")).await;
    assert_eq!(a.status, StatusCode::OK);
    serde_json::from_slice(&a.body).unwrap()
}

async fn post(c: &TestClient, url: &str) -> Answer {
    send(c, Request::post(url).body(Full::new(Bytes::new())).unwrap()).await
}

fn with_admin(backends: &[&Backend]) -> String {
    format!("admin: 127.0.0.1:0\n{}", backends_yaml(backends))
}

/// lb in-process over `backends` with an admin listener, its admin
/// address, and a client.
async fn with_admin_lb(backends: &[&Backend]) -> (TestLb, std::net::SocketAddr, TestClient) {
    let t = TestLb::start(&with_admin(backends)).await;
    let admin = t.lb.admin_addr().expect("admin bound");
    (t, admin, client())
}

#[test]
fn parser_reads_the_exposition_format() {
    let m = parse_metrics(
        "# HELP x a\n# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"\\\\\"} 3\nup 1\nh_bucket{le=\"+Inf\"} 2\n# EOF\n",
    );
    let labels: BTreeMap<String, String> = [("a", "1"), ("b", "q\"\\")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(m[&("x_total".to_owned(), labels)], 3.0);
    assert_eq!(m[&("up".to_owned(), BTreeMap::new())], 1.0);
    assert_eq!(m.len(), 3);
}

#[tokio::test]
async fn metrics_count_requests_exactly_and_retries() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (t, admin, c) = with_admin_lb(&[&a, &b]).await;
    let before = scrape(&c, admin).await;
    for _ in 0..50 {
        assert_eq!(get(&c, &t.url("/")).await.status, StatusCode::OK);
    }
    let after = scrape(&c, admin).await;
    let moved = after.sum("lb_requests_total", &[]) - before.sum("lb_requests_total", &[]);
    assert_eq!(moved, 50.0);
    assert_eq!(
        after.sum("lb_requests_total", &[("code", "200")]),
        50.0,
        "all 200"
    );
    for backend in [&a, &b] {
        let addr = backend.addr.to_string();
        assert_eq!(
            after.sum("lb_requests_total", &[("backend", &addr)]),
            25.0,
            "round robin splits evenly"
        );
        assert_eq!(
            after.get("lb_backend_healthy", &[("backend", &addr)]),
            Some(1.0)
        );
        // The count drops just after the last byte reaches the client.
        eventually!(
            10,
            scrape(&c, admin)
                .await
                .get("lb_backend_in_flight", &[("backend", &addr)])
                == Some(0.0)
        );
    }
    assert_eq!(after.sum("lb_request_duration_seconds_count", &[]), 50.0);
    assert_eq!(
        after.get("lb_request_duration_seconds_bucket", &[("le", "+Inf")]),
        Some(50.0)
    );
    assert!(after.sum("lb_connections_total", &[]) >= 1.0);
    assert_eq!(after.sum("lb_retries_total", &[]), 0.0);

    // A backend answering 503: the retry goes to the other one.
    a.set_status(503);
    for _ in 0..4 {
        let r = get(&c, &t.url("/")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.text(), "b");
    }
    let retried = scrape(&c, admin).await;
    assert!(
        retried.sum("lb_retries_total", &[("reason", "status")]) >= 1.0,
        "retries counted"
    );
    assert!(
        retried.sum(
            "lb_upstream_attempts_total",
            &[
                ("backend", &a.addr.to_string()),
                ("outcome", "server_error")
            ]
        ) >= 1.0
    );
    // Only the relayed response counts as a request: still exactly 54.
    assert_eq!(retried.sum("lb_requests_total", &[]), 54.0);
    assert_eq!(
        retried.get("lb_config_reloads_total", &[("result", "success")]),
        Some(0.0)
    );
    assert_eq!(
        retried.get("lb_config_last_reload_successful", &[]),
        Some(1.0)
    );
}

#[tokio::test]
async fn broken_config_is_counted_and_shown_with_its_line() {
    let a = Backend::start("a").await;
    let (t, admin, c) = with_admin_lb(&[&a]).await;
    let before = scrape(&c, admin).await;
    let failures = |s: &Scrape| s.sum("lb_config_reloads_total", &[("result", "failure")]);
    // Line 4 (after the harness's `listen:` line) has a bad weight.
    t.rewrite(&format!(
        "admin: 127.0.0.1:0\nbackends:\n  - address: {}\n    weight: lots\n",
        a.addr
    ));
    let r = post(&c, &format!("http://{admin}/reload")).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text());
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["result"], "rejected");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains(":5:13: backends[0].weight: expected an integer, found \"lots\""),
        "{body}"
    );

    let after = scrape(&c, admin).await;
    assert!(failures(&after) > failures(&before));
    assert_eq!(
        after.get("lb_config_last_reload_successful", &[]),
        Some(0.0)
    );
    let status = status_json(&c, admin).await;
    assert_eq!(status["last_reload"]["result"], "failure", "{status}");
    assert_eq!(status["last_reload"]["line"], 5, "{status}");
    assert_eq!(status["last_reload"]["column"], 13, "{status}");
    // The old config still serves.
    assert_eq!(get(&c, &t.url("/")).await.text(), "a");

    // Fixed: applied, and the status says so.
    t.rewrite(&with_admin(&[&a]));
    let r = post(&c, &format!("http://{admin}/reload")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let status = status_json(&c, admin).await;
    assert_eq!(status["last_reload"]["result"], "success");
    assert_eq!(status["backends"][0]["address"], a.addr.to_string());
    assert_eq!(status["backends"][0]["healthy"], true);
    assert!(status["version"]
        .as_str()
        .unwrap()
        .starts_with(env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn removed_backend_series_disappear() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (t, admin, c) = with_admin_lb(&[&a, &b]).await;
    for _ in 0..4 {
        get(&c, &t.url("/")).await;
    }
    let b_addr = b.addr.to_string();
    assert!(scrape(&c, admin).await.mentions("backend", &b_addr));
    t.rewrite(&with_admin(&[&a]));
    let applied = t.applied();
    eventually!(10, t.applied() > applied);
    let after = scrape(&c, admin).await;
    assert!(!after.mentions("backend", &b_addr), "b still exported");
    assert!(after.mentions("backend", &a.addr.to_string()));
    assert_eq!(
        after.get("lb_config_reloads_total", &[("result", "success")]),
        Some(1.0)
    );
}

#[tokio::test]
async fn probes_and_admin_listener_follows_reloads() {
    let a = Backend::start("a").await;
    let (t, admin, c) = with_admin_lb(&[&a]).await;
    assert_eq!(
        get(&c, &format!("http://{admin}/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&c, &format!("http://{admin}/readyz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&c, &format!("http://{admin}/nope")).await.status,
        StatusCode::NOT_FOUND
    );
    // The proxy port does not serve admin paths: they go to the backend.
    assert_eq!(get(&c, &t.url("/metrics")).await.text(), "a");

    // Moved to another port by a reload.
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let moved = spare.local_addr().unwrap();
    drop(spare);
    t.rewrite(&format!("admin: {moved}\n{}", backends_yaml(&[&a])));
    eventually!(10, t.lb.admin_addr() == Some(moved));
    assert_eq!(
        get(&c, &format!("http://{moved}/healthz")).await.status,
        StatusCode::OK
    );
    // Disabled by a reload.
    t.rewrite(&backends_yaml(&[&a]));
    eventually!(10, t.lb.admin_addr().is_none());
    eventually!(10, tokio::net::TcpStream::connect(moved).await.is_err());
    // Enabled again.
    t.rewrite(&with_admin(&[&a]));
    eventually!(10, t.lb.admin_addr().is_some());
    let admin = t.lb.admin_addr().unwrap();
    assert_eq!(
        get(&c, &format!("http://{admin}/readyz")).await.status,
        StatusCode::OK
    );
}

/// SIGTERM with `--shutdown-delay`: `/readyz` turns 503 at once while lb
/// keeps serving, and a request in flight still completes with 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_on_sigterm_while_requests_complete() {
    let slow = Backend::start("slow").await;
    slow.set_delay(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{}",
            backends_yaml(&[&slow])
        ),
    );
    let lb = LbProcess::spawn(
        &[
            "--config",
            path.to_str().unwrap(),
            "--shutdown-delay",
            "2s",
            "--shutdown-grace",
            "10s",
        ],
        &[],
    );
    let proxy = lb.wait_listening().await;
    let admin = {
        eventually!(10, lb.log_text().contains("admin listener on "));
        let text = lb.log_text();
        let at = text.split("admin listener on ").nth(1).unwrap();
        at.split_whitespace()
            .next()
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .unwrap()
    };
    let c = client();
    let readyz = format!("http://{admin}/readyz");
    assert_eq!(get(&c, &readyz).await.status, StatusCode::OK);

    let in_flight = {
        let c = c.clone();
        let url = format!("http://{proxy}/slow");
        tokio::spawn(async move { get(&c, &url).await })
    };
    eventually!(10, slow.hits() == 1);
    lb.signal("TERM");
    let signalled = Instant::now();
    eventually!(
        10,
        get(&c, &readyz).await.status == StatusCode::SERVICE_UNAVAILABLE
    );
    let took = signalled.elapsed();
    // Immediate in lb; generous here for a loaded machine.
    assert!(took < Duration::from_secs(2), "/readyz took {took:?}");
    eprintln!("/readyz answered 503 {took:?} after SIGTERM");
    // Still accepting new clients during the delay.
    slow.set_delay(Duration::ZERO);
    let fresh = client();
    assert_eq!(
        get(&fresh, &format!("http://{proxy}/")).await.status,
        StatusCode::OK
    );
    let done = in_flight.await.unwrap();
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(done.text(), "slow");
    assert_eq!(
        get(&c, &format!("http://{admin}/healthz")).await.status,
        StatusCode::OK
    );
    // Then it drains and exits cleanly.
    let mut lb = lb;
    eventually!(
        20,
        lb.child.try_wait().unwrap().is_some(),
        "lb did not exit: {}",
        lb.log_text()
    );
    assert!(lb.child.try_wait().unwrap().unwrap().success());
}

#[tokio::test]
async fn second_sigterm_exits_at_once() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("listen: 127.0.0.1:0\n{}", backends_yaml(&[&a])),
    );
    let mut lb = LbProcess::spawn(
        &[
            "--config",
            path.to_str().unwrap(),
            "--shutdown-delay",
            "60s",
        ],
        &[],
    );
    lb.wait_listening().await;
    lb.signal("TERM");
    eventually!(10, lb.log_text().contains("--shutdown-delay"));
    lb.signal("TERM");
    eventually!(
        10,
        lb.child.try_wait().unwrap().is_some(),
        "{}",
        lb.log_text()
    );
}

/// A `Write` into shared memory, to read what lb logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

async fn logged(format: lb::obs::access_log::Format) -> (Vec<String>, Backend) {
    let a = Backend::start("a").await;
    let t = TestLb::start(&format!("access_log: true\n{}", backends_yaml(&[&a]))).await;
    let out = Captured::default();
    t.lb.set_access_log(format, Box::new(out.clone()));
    let c = client();
    assert_eq!(
        get(&c, &t.url("/one?secret=1")).await.status,
        StatusCode::OK
    );
    a.set_status(404);
    assert_eq!(get(&c, &t.url("/two")).await.status, StatusCode::NOT_FOUND);
    eventually!(10, out.lines().len() == 2, "{:?}", out.lines());
    // Turned off by a reload: no more lines.
    t.rewrite(&backends_yaml(&[&a]));
    let applied = t.applied();
    eventually!(10, t.applied() > applied);
    get(&c, &t.url("/three")).await;
    t.lb.runtime().access_log.flush(Duration::from_secs(5));
    assert_eq!(out.lines().len(), 2, "{:?}", out.lines());
    (out.lines(), a)
}

#[tokio::test]
async fn access_log_text_line_per_request() {
    let (lines, a) = logged(lb::obs::access_log::Format::Text).await;
    let first: Vec<&str> = lines[0].split(' ').collect();
    assert!(
        first[0].ends_with('Z') && first[0].contains('T'),
        "{}",
        lines[0]
    );
    assert_eq!(first[1], "127.0.0.1");
    assert_eq!(first[2], "GET");
    assert_eq!(first[3], "/one", "path without the query");
    assert_eq!(first[4], "200");
    assert_eq!(first[5], format!("backend={}", a.addr));
    assert_eq!(first[6], "attempts=1");
    assert!(first[7].starts_with("upstream_ms="), "{}", lines[0]);
    assert!(first[8].starts_with("duration_ms="), "{}", lines[0]);
    assert!(lines[1].contains(" /two 404 "), "{}", lines[1]);
}

#[tokio::test]
async fn access_log_json_line_per_request() {
    let (lines, a) = logged(lb::obs::access_log::Format::Json).await;
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/one");
    assert_eq!(v["status"], 200);
    assert_eq!(v["backend"], a.addr.to_string());
    assert_eq!(v["attempts"], 1);
    assert!(
        v["upstream_ms"].is_f64() || v["upstream_ms"].is_u64(),
        "{v}"
    );
    assert!(v["duration_ms"].as_f64().unwrap() >= v["upstream_ms"].as_f64().unwrap());
    assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["status"], 404);
}

/// The real binary with `--log-format json`: access log lines on stdout,
/// flushed by shutdown.
#[tokio::test]
async fn binary_writes_json_access_log_on_stdout() {
    use std::io::Read;
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!(
            "listen: 127.0.0.1:0\naccess_log: true\n{}",
            backends_yaml(&[&a])
        ),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["--config", path.to_str().unwrap(), "--log-format", "json"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    // Reads stderr to its end, so lb never writes into a closed pipe.
    let log = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut tx = Some(tx);
        let mut text = String::new();
        for line in stderr.lines().map_while(Result::ok) {
            let addr = line.split("listening on ").nth(1).and_then(|a| {
                a.split('"')
                    .next()?
                    .trim()
                    .parse::<std::net::SocketAddr>()
                    .ok()
            });
            if let (Some(addr), Some(tx)) = (addr, tx.take_if(|_| addr.is_some())) {
                let _ = tx.send(addr);
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let addr = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("lb never listened")
        .unwrap();
    let c = client();
    assert_eq!(
        get(&c, &format!("http://{addr}/x")).await.status,
        StatusCode::OK
    );
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let out = tokio::task::spawn_blocking(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    })
    .await
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {}", log.join().unwrap());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    let v: serde_json::Value =
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(v["path"], "/x");
    assert_eq!(v["status"], 200);
    assert_eq!(v["backend"], a.addr.to_string());
}

#[test]
fn version_names_the_commit_when_git_knows_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!("lb {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    // Built from a git checkout: the commit is named.
    if git.is_ok_and(|g| g.status.success()) {
        assert!(text.contains("(commit "), "{text}");
    }
}

#[test]
fn completions_for_bash() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("--shutdown-delay"), "{script}");
}

#[tokio::test]
async fn tcp_mode_metrics_count_connections_attempts_and_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = EchoBackend::start("e").await;
    let t = TestLb::start(&format!(
        "mode: tcp\nadmin: 127.0.0.1:0\nbackends:\n  - address: {}\n",
        echo.addr
    ))
    .await;
    let admin = t.lb.admin_addr().expect("admin bound");
    let c = client();
    let mut s = tokio::net::TcpStream::connect(t.lb.local_addr())
        .await
        .unwrap();
    s.write_all(&[b'x'; 1000]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.len() >= 1000);
    let backend = echo.addr.to_string();
    let b = backend.as_str();
    eventually!(20, {
        let m = scrape(&c, admin).await;
        m.sum(
            "lb_backend_bytes_total",
            &[("backend", b), ("direction", "to_backend")],
        ) == 1000.0
            && m.sum(
                "lb_backend_bytes_total",
                &[("backend", b), ("direction", "to_client")],
            ) == out.len() as f64
    });
    let m = scrape(&c, admin).await;
    assert_eq!(
        m.sum(
            "lb_upstream_attempts_total",
            &[("backend", b), ("outcome", "success")]
        ),
        1.0
    );
    assert!(m.sum("lb_connections_total", &[]) >= 1.0);
}
