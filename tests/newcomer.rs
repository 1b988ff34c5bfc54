//! Issue 21: a newcomer's first ten minutes — log settings from the
//! environment, what startup, shutdown and a missing config say, reload
//! lines that name what changed, a dead pool that explains itself, and the
//! shipped Docker config.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

/// Waits (with a deadline) for the real lb to exit and returns its status.
async fn exited(p: &mut LbProcess) -> std::process::ExitStatus {
    eventually!(
        WAIT,
        p.child.try_wait().unwrap().is_some(),
        "lb did not exit: {}",
        p.log_text()
    );
    p.child.wait().unwrap()
}

fn json_lines(p: &LbProcess) -> Vec<serde_json::Value> {
    p.log
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn lb_log_format_and_lb_log_level_are_honoured_from_the_environment() {
    let backend = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("listen: 127.0.0.1:0\n{}", backends_yaml(&[&backend]));
    let path = write_config(dir.path(), &yaml);
    // A typo'd variable: its warning is the one line `warn` lets through.
    let mut p = LbProcess::spawn(
        &["--config", path.to_str().unwrap()],
        &[
            ("LB_LOG_FORMAT", "json"),
            ("LB_LOG_LEVEL", "warn"),
            ("LB_STRATGY", "random"),
        ],
    );
    eventually!(
        WAIT,
        p.log_text().contains("LB_STRATGY"),
        "no warning: {}",
        p.log_text()
    );
    p.signal("TERM");
    assert!(exited(&mut p).await.success(), "{}", p.log_text());
    let lines = json_lines(&p);
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(
            matches!(line["level"].as_str(), Some("WARN" | "ERROR")),
            "only warnings and errors at LB_LOG_LEVEL=warn: {line}"
        );
        assert!(line["timestamp"].is_string(), "{line}");
    }

    // The flag wins over the variable, as with LB_CONFIG.
    let p = LbProcess::spawn(
        &["--config", path.to_str().unwrap(), "--log-format", "text"],
        &[("LB_LOG_FORMAT", "json"), ("LB_LOG_LEVEL", "info")],
    );
    p.wait_listening().await;
    assert!(p.log_text().contains(" INFO "), "{}", p.log_text());
}

#[tokio::test]
async fn a_bad_lb_log_level_is_refused_naming_the_problem() {
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["--check", "--config", "/nonexistent/c.yaml"])
        .env("LB_LOG_LEVEL", "verbose")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`verbose` names no level"), "{stderr}");
}

#[tokio::test]
async fn startup_names_version_and_every_address_and_shutdown_has_a_final_line() {
    let backend = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{}",
        backends_yaml(&[&backend])
    );
    let path = write_config(dir.path(), &yaml);
    let mut p = LbProcess::spawn(&["--config", path.to_str().unwrap()], &[]);
    let proxy = p.wait_listening().await;
    eventually!(
        WAIT,
        p.log_text().contains(" started: "),
        "{}",
        p.log_text()
    );
    let log = p.log_text();
    let started = log.lines().find(|l| l.contains(" started: ")).unwrap();
    assert!(
        started.contains(&format!("lb {} started", lb::VERSION)),
        "{started}"
    );
    assert!(
        started.contains(&format!("proxy http://{proxy}")),
        "{started}"
    );
    let admin = started
        .split("admin http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no admin address: {started}"));
    let status = get(&client(), &format!("http://{admin}/healthz")).await;
    assert_eq!(status.status, 200);

    p.signal("TERM");
    assert!(exited(&mut p).await.success());
    let log = p.log_text();
    assert!(
        log.lines().last().unwrap().ends_with("lb stopped"),
        "last line: {log}"
    );
}

#[tokio::test]
async fn a_missing_config_is_named_by_its_absolute_path_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let expected = dir.path().canonicalize().unwrap().join("config.yaml");
    for args in [&["--check"][..], &[][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_lb"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("LB_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "{}: cannot read: no such file",
                expected.display()
            )),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("--config PATH"), "{args:?}: {stderr}");
        assert!(stderr.contains("LB_CONFIG"), "{args:?}: {stderr}");
    }
}

/// Replaces `path` at once (write a temp file, rename it over).
fn replace(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn reload_lines_name_what_changed_and_a_restored_file_is_recognised() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    let first = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nhealth_check:\n  path: /health\n{}",
        backends_yaml(&[&a])
    );
    let path = write_config(dir.path(), &first);
    let p = LbProcess::spawn(
        &["--config", path.to_str().unwrap(), "--log-format", "json"],
        &[],
    );
    wait_started(&p).await;

    let second = format!(
        "listen: 127.0.0.1:0\ntimeouts:\n  connect: 2s\naccess_log: true\n{}",
        backends_yaml(&[&a, &b])
    );
    replace(&path, &second);
    eventually!(
        WAIT,
        p.log_text().contains("config reloaded"),
        "{}",
        p.log_text()
    );
    let reloaded = message_of(&p, "config reloaded");
    assert!(
        reloaded.ends_with(&format!(
            "changed admin 127.0.0.1:0→none, access_log false→true, timeouts.connect 1s→2s, \
             health_check removed; backends +1 -0 (added {})",
            b.addr
        )),
        "{reloaded}"
    );
    let hash = lb::config::ContentHash::of(second.as_bytes()).to_string();
    assert!(hash.starts_with("sha256:"), "{hash}");
    let line = line_of(&p, "config reloaded");
    assert_eq!(line["fields"]["hash"], hash.as_str(), "{line}");

    // A rejected edit: its position is in the line's fields.
    replace(&path, &format!("{second}retry:\n  attempts: three\n"));
    eventually!(WAIT, p.log_text().contains("config reload rejected"));
    let rejected = line_of(&p, "config reload rejected");
    assert!(rejected["fields"]["line"].as_u64().is_some(), "{rejected}");
    assert!(
        rejected["fields"]["column"].as_u64().is_some(),
        "{rejected}"
    );

    // Back to the running config: said as such, not "unchanged".
    replace(&path, &second);
    eventually!(
        WAIT,
        p.log_text()
            .contains("config matches the running one again"),
        "{}",
        p.log_text()
    );
    assert!(
        !p.log_text().contains("config unchanged"),
        "{}",
        p.log_text()
    );
}

/// The last JSON log line whose message contains `needle`.
fn line_of(p: &LbProcess, needle: &str) -> serde_json::Value {
    json_lines(p)
        .into_iter()
        .rev()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle))
        })
        .unwrap_or_else(|| panic!("no line with {needle:?}: {}", p.log_text()))
}

fn message_of(p: &LbProcess, needle: &str) -> String {
    line_of(p, needle)["fields"]["message"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits for the line saying lb started (any log format).
async fn wait_started(p: &LbProcess) {
    eventually!(
        WAIT,
        p.log_text().contains(" started: proxy "),
        "lb never started: {}",
        p.log_text()
    );
}

const POOL_DOWN_404: &str =
    "all 2 backends fail GET /health (404 Not Found): is health_check.path right?";

#[tokio::test]
async fn a_pool_down_by_health_checks_says_why_in_the_503_and_on_status() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    a.set_health(404);
    b.set_health(404);
    let yaml = format!(
        "admin: 127.0.0.1:0\nhealth_check:\n  path: /health\n  interval: 500ms\n  timeout: 500ms\n  unhealthy_threshold: 1\n  healthy_threshold: 1\n{}",
        backends_yaml(&[&a, &b])
    );
    let lb = TestLb::start(&yaml).await;
    let runtime = lb.lb.runtime();
    eventually!(
        WAIT,
        runtime.snapshot().first_pool().shared.down.load().is_some()
    );
    assert_eq!(
        runtime
            .snapshot()
            .first_pool()
            .shared
            .down
            .load()
            .as_deref()
            .map(String::as_str),
        Some(POOL_DOWN_404)
    );
    let want_body = format!("lb: no healthy backend available: {POOL_DOWN_404}\n");
    for http in [client(), h2c_client()] {
        let answer = get(&http, &lb.url("/")).await;
        assert_eq!(answer.status, 503);
        assert_eq!(answer.text(), want_body);
    }
    let admin = lb.lb.admin_addr().unwrap();
    let status = get(&client(), &format!("http://{admin}/status")).await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    assert_eq!(status["pool_down"], POOL_DOWN_404);

    // One backend back: the verdict goes, traffic flows.
    a.set_health(200);
    eventually!(
        WAIT,
        runtime.snapshot().first_pool().shared.down.load().is_none()
    );
    assert_eq!(get(&client(), &lb.url("/")).await.status, 200);
    let status = get(&client(), &format!("http://{admin}/status")).await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    assert!(status["pool_down"].is_null(), "{status}");
}

#[tokio::test]
async fn mixed_causes_are_counted_and_a_dead_pool_is_logged_once() {
    let a = Backend::start("a").await;
    let mut b = Backend::start("b").await;
    a.set_health(503);
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nhealth_check:\n  path: /health\n  interval: 300ms\n  timeout: 300ms\n  unhealthy_threshold: 1\n{}",
        backends_yaml(&[&a, &b])
    );
    let path = write_config(dir.path(), &yaml);
    b.stop().await;
    let p = LbProcess::spawn(&["--config", path.to_str().unwrap()], &[]);
    p.wait_listening().await;
    eventually!(
        WAIT,
        p.log_text().contains("no backend can be used"),
        "{}",
        p.log_text()
    );
    let verdict = |p: &LbProcess| {
        p.log_text()
            .lines()
            .filter(|l| l.contains("no backend can be used"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let lines = verdict(&p);
    assert!(
        lines[0].contains("all 2 backends fail GET /health (")
            && lines[0].contains("503 Service Unavailable ×1")
            && lines[0].contains("×1)"),
        "{lines:?}"
    );
    // Many more failed probes later, still one line.
    let probes = a.probes();
    eventually!(WAIT, a.probes() >= probes + 5);
    assert_eq!(verdict(&p).len(), 1, "{}", p.log_text());
}

/// The container demo's config (deploy/config.yaml) is valid as shipped:
/// loaded through the library, not `lb --check`, so that the compose
/// service names it uses need not resolve here.
#[test]
fn the_shipped_docker_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config.yaml");
    let bytes = std::fs::read(&path).unwrap();
    let config = lb::config::Config::parse(&bytes, &path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listen().to_string(), "0.0.0.0:8080");
    assert_eq!(
        config.admin.map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:9901")
    );
    assert!(
        config
            .first_pool()
            .backends
            .iter()
            .all(|b| !b.address.as_str().starts_with("127.")),
        "a container's 127.0.0.1 is itself: {:?}",
        config.first_pool().backends
    );
    let compose =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml"))
            .unwrap();
    for b in &config.first_pool().backends {
        let host = b.address.as_str().rsplit_once(':').unwrap().0;
        assert!(
            compose.contains(&format!("  {host}:")),
            "deploy/config.yaml's backend {host} is no service in docker-compose.yml"
        );
    }
}
