//! Issue 20, items 8–11: the config watch survives its directory being
//! deleted and recreated, a UTF-8 BOM is read as the YAML it is, a removed
//! health-checked backend's probe connection is closed, and `/metrics`
//! scrapes do not run on the proxy's workers.
//!
//! Watch tests run lb with a poll interval far longer than what they wait,
//! so only file events can have applied a change. No sleep synchronises:
//! each test waits for the condition it needs with a generous deadline.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longer than any wait below: a change seen sooner came from file events.
const SLOW_POLL: Duration = Duration::from_secs(60);

/// lb in-process on the config at `path` (which says `listen: 127.0.0.1:0`).
async fn start_at(path: &Path, poll_interval: Duration) -> lb::Lb {
    let (config, hash) = lb::config::Config::load(path).unwrap();
    let listener = lb::net::listen::bind(config.listen()).unwrap();
    let settings = settings(
        path,
        lb::reload::WatchSettings {
            watch: true,
            poll_interval,
        },
    );
    lb::Lb::start(listener, config, hash, settings).unwrap()
}

fn yaml(backends: &[&Backend]) -> String {
    format!("listen: 127.0.0.1:0\n{}", backends_yaml(backends))
}

fn reads(lb: &lb::Lb) -> u64 {
    lb.runtime().reloads.reads.load(SeqCst)
}

fn rejected(lb: &lb::Lb) -> u64 {
    lb.runtime().reloads.rejected.load(SeqCst)
}

/// Waits until requests through lb are answered by `want`.
async fn answers(c: &TestClient, url: &str, want: &str, why: &str) {
    eventually!(
        WAIT,
        get(c, url).await.text() == want,
        "{why}: requests never reached backend {want}"
    );
}

// ---------------------------------------------------------------------------
// Item 8: the watch comes back with its directory
// ---------------------------------------------------------------------------

/// lb watching `root/conf/config.yaml`, serving `a`.
/// Recreates the removed config directory with a config for `b`, waits
/// until lb serves it, then checks the new watch follows an edit back to `a`.
async fn recreate_and_follow(w: &Watched, a: &Backend, b: &Backend) {
    std::fs::create_dir(&w.dir).unwrap();
    write_config(&w.dir, &yaml(&[b]));
    answers(
        &w.c,
        &w.url,
        "b",
        "a config written into the recreated directory",
    )
    .await;
    // And the new watch keeps working for the next edit.
    std::fs::write(&w.path, yaml(&[a])).unwrap();
    answers(&w.c, &w.url, "a", "an edit after the directory came back").await;
    assert_eq!(rejected(&w.lb), 0);
}

struct Watched {
    _root: tempfile::TempDir,
    dir: PathBuf,
    path: PathBuf,
    lb: lb::Lb,
    c: TestClient,
    url: String,
}

async fn watched(a: &Backend) -> Watched {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("conf");
    std::fs::create_dir(&dir).unwrap();
    let path = write_config(&dir, &yaml(&[a]));
    let lb = start_at(&path, SLOW_POLL).await;
    let c = client();
    let url = format!("http://{}/", lb.local_addr());
    // On the current-thread runtime this also means the watch is armed.
    assert_eq!(get(&c, &url).await.text(), "a");
    Watched {
        _root: root,
        dir,
        path,
        lb,
        c,
        url,
    }
}

/// `rm -rf conf; mkdir conf; write conf/config.yaml`, after lb saw the
/// removal: the watch on the new directory must be armed from the events
/// of its parent, not by the (60 s) poll.
#[tokio::test]
async fn a_recreated_config_directory_is_watched_again() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let w = watched(&a).await;

    let before = reads(&w.lb);
    std::fs::remove_dir_all(&w.dir).unwrap();
    eventually!(
        WAIT,
        reads(&w.lb) > before,
        "the removal was never looked at"
    );
    recreate_and_follow(&w, &a, &b).await;
}

/// The same, with no pause between removal and recreation: lb may see the
/// new directory before or after its parent's watch is armed. (This passed
/// before the fix too: the read after the removal found the new file, and
/// the file's own watch, re-armed after it, saw the next edit. It guards
/// that race, not the bug.)
#[tokio::test]
async fn a_directory_recreated_at_once_is_watched_again() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let w = watched(&a).await;

    std::fs::remove_dir_all(&w.dir).unwrap();
    recreate_and_follow(&w, &a, &b).await;
}

/// `mv conf conf.old; mkdir conf`: the old directory still exists (the
/// inotify watch follows it), so only its identity says the path now names
/// another one.
#[tokio::test]
async fn a_config_directory_replaced_by_rename_is_watched_again() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let w = watched(&a).await;

    let before = reads(&w.lb);
    std::fs::rename(&w.dir, w.dir.with_file_name("conf.old")).unwrap();
    eventually!(WAIT, reads(&w.lb) > before, "the move was never looked at");
    std::fs::create_dir(&w.dir).unwrap();
    write_config(&w.dir, &yaml(&[&b]));
    answers(&w.c, &w.url, "b", "a config written into the new directory").await;
    std::fs::write(&w.path, yaml(&[&a])).unwrap();
    answers(&w.c, &w.url, "a", "an edit in the new directory").await;
}

/// Two levels deleted (`rm -rf root/conf` where conf held `sub/config.yaml`):
/// the watch climbs to the nearest directory that exists and comes back
/// down one level at a time.
#[tokio::test]
async fn a_config_directory_recreated_two_levels_deep_is_watched_again() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let root = tempfile::tempdir().unwrap();
    let top = root.path().join("conf");
    let dir = top.join("sub");
    std::fs::create_dir_all(&dir).unwrap();
    let path = write_config(&dir, &yaml(&[&a]));
    let lb = start_at(&path, SLOW_POLL).await;
    let c = client();
    let url = format!("http://{}/", lb.local_addr());
    assert_eq!(get(&c, &url).await.text(), "a");

    let before = reads(&lb);
    std::fs::remove_dir_all(&top).unwrap();
    eventually!(WAIT, reads(&lb) > before, "the removal was never looked at");
    std::fs::create_dir(&top).unwrap();
    std::fs::create_dir(&dir).unwrap();
    write_config(&dir, &yaml(&[&b]));
    answers(&c, &url, "b", "a config written two recreated levels down").await;
}

// ---------------------------------------------------------------------------
// Item 9: a UTF-8 byte order mark
// ---------------------------------------------------------------------------

const BOM: &str = "\u{feff}";

/// `lb --config PATH --check`: exit code, stdout, stderr.
fn check(path: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .arg("--config")
        .arg(path)
        .arg("--check")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_a_config_that_starts_with_a_bom() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("{BOM}listen: 127.0.0.1:8080\nbackends:\n  - address: 127.0.0.1:9001\n"),
    );
    let (code, stdout, stderr) = check(&path);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("1 backend "), "{stdout}");
}

/// An error in a file with a BOM is reported where it is, on the first line
/// as on later ones: the same message as without the BOM.
#[test]
fn errors_in_a_bom_file_keep_their_line_and_column() {
    for (bad, at) in [
        (
            "listen: 127.0.0.1:8080\nbackends:\n  - address: 127.0.0.1:9001\n    wieght: 2\n",
            "config.yaml:4:5:",
        ),
        ("strategy: [random\nbackends: []\n", "config.yaml:1:"),
        (
            "listen: 127.0.0.1:8080\nbackends:\n  - address: 127.0.0.1:9001\n   weight: 1\n",
            "config.yaml:4:",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let plain = check(&write_config(dir.path(), bad));
        let with_bom = check(&write_config(dir.path(), &format!("{BOM}{bad}")));
        assert_eq!(with_bom.0, Some(1), "{}", with_bom.2);
        assert!(with_bom.2.contains(at), "want {at}: {}", with_bom.2);
        assert_eq!(with_bom.2, plain.2, "the BOM moved the reported position");
    }
}

#[tokio::test]
async fn a_live_reload_accepts_a_bom() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let w = watched(&a).await;
    std::fs::write(&w.path, format!("{BOM}{}", yaml(&[&b]))).unwrap();
    answers(&w.c, &w.url, "b", "a config saved with a BOM").await;
    assert_eq!(rejected(&w.lb), 0);
}

// ---------------------------------------------------------------------------
// Item 10a: a removed backend's probe connection is closed
// ---------------------------------------------------------------------------

/// A keep-alive HTTP/1.1 server answering every request `200 ok`, counting
/// the connections it holds open and the requests it answered.
struct CountingBackend {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl CountingBackend {
    async fn start() -> CountingBackend {
        let (open, requests) = (Arc::<AtomicUsize>::default(), Arc::<AtomicUsize>::default());
        let (o, r) = (open.clone(), requests.clone());
        let addr = raw_server(move |mut s| {
            let (open, requests) = (o.clone(), r.clone());
            async move {
                open.fetch_add(1, SeqCst);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    // Probes are bodiless GETs: one head, one answer.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        requests.fetch_add(1, SeqCst);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(answer).await.is_err() {
                            break;
                        }
                    }
                }
                open.fetch_sub(1, SeqCst);
            }
        })
        .await;
        CountingBackend {
            addr,
            open,
            requests,
        }
    }
}

/// 50 reloads that each add or remove a health-checked backend: once the
/// last is gone, no probe connection to any of them stays open (before the
/// fix each stayed in a shared pool until its 30 s idle timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backends_probe_connection_is_closed() {
    let a = Backend::start("a").await;
    let mut probed = Vec::new();
    for _ in 0..5 {
        probed.push(CountingBackend::start().await);
    }
    let checks = "health_check:\n  path: /health\n  interval: 500ms\n  timeout: 500ms\n";
    let config = |extra: Option<&CountingBackend>| {
        let mut s = format!("{checks}backends:\n  - address: {}\n", a.addr);
        if let Some(extra) = extra {
            s.push_str(&format!("  - address: {}\n", extra.addr));
        }
        s
    };
    let lb = TestLb::start(&config(None)).await;
    let mut applied = lb.applied();
    for round in 0..25 {
        let extra = &probed[round % probed.len()];
        let before = extra.requests.load(SeqCst);
        lb.rewrite(&config(Some(extra)));
        applied += 1;
        eventually!(
            WAIT,
            lb.applied() == applied,
            "reload {round} never applied"
        );
        eventually!(
            WAIT,
            extra.requests.load(SeqCst) > before,
            "the added backend was never probed"
        );
        lb.rewrite(&config(None));
        applied += 1;
        eventually!(
            WAIT,
            lb.applied() == applied,
            "reload {round} never applied"
        );
    }
    let open = || probed.iter().map(|b| b.open.load(SeqCst)).sum::<usize>();
    eventually!(
        WAIT,
        open() == 0,
        "{} probe connections to removed backends still open",
        open()
    );
}

// ---------------------------------------------------------------------------
// Item 10b: /metrics at many backends
// ---------------------------------------------------------------------------

async fn scrape(c: &TestClient, admin: SocketAddr) -> String {
    let a = get(c, &format!("http://{admin}/metrics")).await;
    assert_eq!(a.status, 200);
    a.text()
}

/// At 10,000 backends one encoding costs far more than
/// `lb::admin::CHEAP_SCRAPE` of CPU: a scrape right after it gets the same
/// body (counters as of the first), so hammering `/metrics` costs lb about
/// 1 % of a core; a reload invalidates it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expensive_metrics_body_is_reused_until_the_config_changes() {
    let dead: String = (0..10_000)
        .map(|i| format!("  - address: 127.0.{}.{}:9\n", i / 250 + 1, i % 250 + 1))
        .collect();
    let yaml = |n: usize| {
        let list: String = dead.lines().take(n).map(|l| format!("{l}\n")).collect();
        format!("admin: 127.0.0.1:0\nbackends:\n{list}")
    };
    let lb = TestLb::start(&yaml(10_000)).await;
    let admin = lb.lb.admin_addr().expect("admin bound");
    let c = client();
    let first = scrape(&c, admin).await;
    assert!(first.contains("127.0.40.250:9"), "not all backends shown");

    // A client connection changes lb_connections_total…
    let accepted = lb.lb.runtime().connections.total();
    let conn = tokio::net::TcpStream::connect(lb.lb.local_addr())
        .await
        .unwrap();
    eventually!(WAIT, lb.lb.runtime().connections.total() > accepted);
    drop(conn);
    // …but the body encoded a moment ago is served again.
    assert_eq!(
        scrape(&c, admin).await,
        first,
        "an expensive body was encoded again at once"
    );

    lb.rewrite(&yaml(9_999));
    eventually!(WAIT, lb.applied() == 2, "the reload never applied");
    let after_reload = scrape(&c, admin).await;
    assert!(
        !after_reload.contains("127.0.40.250:9"),
        "a body of the old config was served after a reload"
    );
    assert!(
        after_reload.contains(&format!("lb_connections_total {}", accepted + 1)),
        "the new body does not show the connection"
    );
}
