//! The `lb` binary: `--check`, environment overrides, startup errors.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn lb() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lb"));
    c.env_remove("RUST_LOG");
    c
}

/// Runs `cmd` to completion, failing the test (and killing lb) if it has not
/// exited within `secs`: the bugs here are lb blocking for ever.
fn output_within(cmd: &mut Command, secs: u64) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "lb still running after {secs}s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// What `lb --check` said about `yaml`, with `envs` set.
struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    path: std::path::PathBuf,
}

fn check(yaml: &str, envs: &[(&str, &str)]) -> Checked {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), yaml);
    check_path(&path, &[], envs)
}

/// `lb --check ARGS…` on a valid one-backend file.
fn check_flags(args: &[&str]) -> Checked {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), ONE_BACKEND);
    check_path(&path, args, &[])
}

/// `lb --config PATH --check ARGS…` with `envs` set.
fn check_path(path: &Path, args: &[&str], envs: &[(&str, &str)]) -> Checked {
    let out = output_within(
        lb().arg("--config")
            .arg(path)
            .arg("--check")
            .args(args)
            .envs(envs.iter().copied()),
        WAIT,
    );
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        path: path.to_owned(),
    }
}

const ONE_BACKEND: &str = "backends:\n  - address: 127.0.0.1:9001\n";

#[test]
fn check_accepts_a_good_file_and_summarises_it() {
    let c = check(
        "backends:\n  - address: 127.0.0.1:9001\n    weight: 2\n",
        &[],
    );
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert!(
        c.stdout.contains("ok") && c.stdout.contains("1 backend (total weight 2)"),
        "{}",
        c.stdout
    );
}

#[test]
fn check_rejects_a_bad_file_with_position() {
    let c = check(
        "listen: 127.0.0.1:8080\nstratgy: random\nbackends: []\n",
        &[],
    );
    assert_eq!(c.code, Some(1));
    assert!(
        c.stderr.contains(&c.path.display().to_string()),
        "{}",
        c.stderr
    );
    assert!(
        c.stderr.contains(":2:1: stratgy: unknown key"),
        "{}",
        c.stderr
    );
}

#[test]
fn check_reports_a_missing_file() {
    let out = lb()
        .args(["--config", "/nonexistent/lb.yaml", "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/lb.yaml: cannot read"));
}

#[test]
fn config_path_from_lb_config_env() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), ONE_BACKEND);
    let out = lb()
        .arg("--check")
        .env("LB_CONFIG", &path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn environment_overrides_nested_keys() {
    let c = check(
        ONE_BACKEND,
        &[("LB_LISTEN", "127.0.0.1:18999"), ("LB_STRATEGY", "random")],
    );
    assert!(
        c.stdout.contains("listen 127.0.0.1:18999") && c.stdout.contains("strategy random"),
        "{}",
        c.stdout
    );
    let c = check(ONE_BACKEND, &[("LB_TIMEOUTS__CONNECT", "0s")]);
    assert_eq!(c.code, Some(1));
    assert!(
        c.stderr
            .contains("timeouts.connect: must be greater than zero"),
        "{}",
        c.stderr
    );
    // A typo in a nested key is an error, as it would be in the file.
    let c = check(ONE_BACKEND, &[("LB_TIMEOUTS__CONEKT", "2s")]);
    assert_eq!(c.code, Some(1), "{}", c.stderr);
    assert!(c.stderr.contains("conekt"), "{}", c.stderr);
}

/// What Kubernetes injects into every pod for a Service named `lb` (and one
/// named `lb-admin`) in the same namespace.
const SERVICE_LINKS: &[(&str, &str)] = &[
    ("LB_PORT", "tcp://10.96.0.12:80"),
    ("LB_SERVICE_HOST", "10.96.0.12"),
    ("LB_SERVICE_PORT", "80"),
    ("LB_SERVICE_PORT_HTTP", "80"),
    ("LB_PORT_80_TCP", "tcp://10.96.0.12:80"),
    ("LB_PORT_80_TCP_PROTO", "tcp"),
    ("LB_PORT_80_TCP_PORT", "80"),
    ("LB_PORT_80_TCP_ADDR", "10.96.0.12"),
    ("LB_ADMIN_PORT", "tcp://10.96.0.13:9000"),
    ("LB_ADMIN_SERVICE_HOST", "10.96.0.13"),
];

/// A Service named `lb` used to crash-loop lb (`unknown field: found port`).
#[test]
fn kubernetes_service_links_are_ignored_silently() {
    let mut envs = SERVICE_LINKS.to_vec();
    envs.push(("LB_LISTEN", "127.0.0.1:18998"));
    let c = check(ONE_BACKEND, &envs);
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert!(c.stdout.contains("listen 127.0.0.1:18998"), "{}", c.stdout);
    assert!(!c.stderr.contains("warning"), "{}", c.stderr);
}

/// An `LB_` variable that overrides nothing is reported, naming it, but does
/// not stop lb: it may belong to something else in the pod.
#[test]
fn unknown_lb_variable_is_a_warning_naming_it() {
    let c = check(
        ONE_BACKEND,
        &[("LB_STRATGY", "random"), ("LB_PORT", "8080")],
    );
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert!(c.stdout.contains("strategy round_robin"), "{}", c.stdout);
    for name in ["LB_STRATGY", "LB_PORT"] {
        assert!(
            c.stderr
                .contains(&format!("warning: environment variable {name} is ignored")),
            "{name}: {}",
            c.stderr
        );
    }
}

#[test]
fn zero_poll_interval_is_refused() {
    let c = check_flags(&["--poll-interval", "0s"]);
    assert_eq!(c.code, Some(2), "{}", c.stderr);
    assert!(
        c.stderr.contains("--poll-interval") && c.stderr.contains("greater than zero"),
        "{}",
        c.stderr
    );
}

#[test]
fn workers_and_http1_flags_are_checked() {
    for (args, code) in [
        (&["--workers", "1"][..], 0),
        (&["--workers", "4", "--http1", "hyper"], 0),
        (&["--http1", "fast"], 0),
        (&["--workers", "0"], 2),
        (&["--http1", "h3"], 2),
    ] {
        let c = check_flags(args);
        assert_eq!(c.code, Some(code), "{args:?}: {}", c.stderr);
    }
}

#[test]
fn log_level_must_name_levels() {
    for bad in ["verbose", "info,lb=loud", "lb"] {
        let c = check_flags(&["--log-level", bad]);
        assert_eq!(c.code, Some(2), "{bad}: {}", c.stderr);
        assert!(
            c.stderr.contains("--log-level") && c.stderr.contains("names no level"),
            "{bad}: {}",
            c.stderr
        );
    }
    for good in [
        "info",
        "DEBUG",
        "lb=debug,notify=warn",
        "warn,lb::reload=trace",
    ] {
        let c = check_flags(&["--log-level", good]);
        assert_eq!(c.code, Some(0), "{good}: {}", c.stderr);
    }
}

/// A FIFO as the config used to block `--check` and startup for ever.
#[test]
fn fifo_config_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("config.yaml");
    mkfifo(&fifo);
    let c = check_path(&fifo, &[], &[]);
    assert_eq!(c.code, Some(1), "{}", c.stderr);
    assert!(
        c.stderr.contains("config.yaml: cannot read: is a FIFO"),
        "{}",
        c.stderr
    );
    let out = output_within(lb().arg("--config").arg(&fifo), WAIT);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is a FIFO"), "{stderr}");
}

#[test]
fn directory_and_oversized_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = check_path(dir.path(), &[], &[]);
    assert_eq!(c.code, Some(1), "{}", c.stderr);
    assert!(c.stderr.contains("is a directory"), "{}", c.stderr);

    let big = write_config(dir.path(), ONE_BACKEND);
    // Sparse: 17 MiB of nothing costs no disk.
    std::fs::File::options()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    let c = check_path(&big, &[], &[]);
    assert_eq!(c.code, Some(1), "{}", c.stderr);
    assert!(c.stderr.contains("larger than 16 MiB"), "{}", c.stderr);
}

/// 100,000 nested `[` took 50 s of CPU to reject.
#[test]
fn deep_nesting_is_refused_with_its_position() {
    let c = check(&format!("backends: {}", "[".repeat(100_000)), &[]);
    assert_eq!(c.code, Some(1), "{}", c.stderr);
    assert!(
        c.stderr.contains(":1:75: nesting deeper than 64 levels"),
        "{}",
        c.stderr
    );
}

#[tokio::test]
async fn serves_with_env_listen_and_exits_cleanly_on_sigterm() {
    let b = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("listen: 127.0.0.1:1\n{}", backends_yaml(&[&b])),
    );
    let mut p = LbProcess::spawn(
        &[
            "--config",
            path.to_str().unwrap(),
            "--shutdown-grace",
            "60s",
        ],
        &[("LB_LISTEN", "127.0.0.1:0")],
    );
    let addr = p.wait_listening().await;
    let a = get(&client(), &format!("http://{addr}/")).await;
    assert_eq!(a.text(), "b");
    p.signal("TERM");
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || p.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Idle connections close at once: exit does not wait out the 60 s grace
    // period (the bound is that, not a speed: a loaded box may be slow).
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "{:?}",
        started.elapsed()
    );
}

/// lb in a pod next to a Service named `lb`, with a typo'd variable: it
/// serves, warns about the typo once at startup, and not again per reload.
/// Its default log filter keeps notify's own lines (logged on every
/// rename-over save) out.
#[tokio::test]
async fn serves_among_service_links_and_warns_once() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    let yaml = |b: &Backend| format!("listen: 127.0.0.1:0\n{}", backends_yaml(&[b]));
    let path = write_config(dir.path(), &yaml(&a));
    let mut envs = SERVICE_LINKS.to_vec();
    envs.push(("LB_STRATGY", "random"));
    let p = LbProcess::spawn(&["--config", path.to_str().unwrap()], &envs);
    let addr = p.wait_listening().await;
    let c = client();
    let u = format!("http://{addr}/");
    assert_eq!(get(&c, &u).await.text(), "a");
    // Two rename-over saves; after the second is logged, the first one's
    // notify lines (if any) would be in the log already.
    for (i, next) in [&b, &a].into_iter().enumerate() {
        let tmp = dir.path().join(".config.yaml.tmp");
        std::fs::write(&tmp, yaml(next)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        eventually!(
            WAIT,
            p.log_text().matches("config reloaded").count() == i + 1,
            "{}",
            p.log_text()
        );
    }
    let log = p.log_text();
    assert_eq!(log.matches("LB_STRATGY").count(), 1, "{log}");
    assert!(
        !log.contains("LB_PORT") && !log.contains("LB_SERVICE"),
        "{log}"
    );
    assert!(!log.contains("notify"), "{log}");
}

#[tokio::test]
async fn startup_with_a_bad_config_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "backends: []\n");
    let mut p = LbProcess::spawn(&["--config", path.to_str().unwrap()], &[]);
    let (status, p) = tokio::task::spawn_blocking(move || (p.child.wait().unwrap(), p))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(1));
    // stderr is read by another thread: the last line may trail the exit.
    eventually!(
        WAIT,
        p.log_text().contains("backends: is empty"),
        "{}",
        p.log_text()
    );
}

/// A second lb started on the address a first one listens on refuses to
/// start: `SO_REUSEPORT` would otherwise have it silently take a share of
/// the first one's connections.
#[tokio::test]
async fn a_second_lb_on_a_busy_address_exits_1() {
    let b = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("listen: 127.0.0.1:0\n{}", backends_yaml(&[&b])),
    );
    let first = LbProcess::spawn(&["--config", path.to_str().unwrap()], &[]);
    let addr = first.wait_listening().await;
    let listen = addr.to_string();
    let mut second = LbProcess::spawn(
        &["--config", path.to_str().unwrap()],
        &[("LB_LISTEN", listen.as_str())],
    );
    // Bounded: without the check, the second one would serve for ever.
    eventually!(
        WAIT,
        second.child.try_wait().unwrap().is_some(),
        "the second lb is still running: {}",
        second.log_text()
    );
    let status = second.child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    eventually!(
        WAIT,
        second.log_text().contains("already in use"),
        "{}",
        second.log_text()
    );
    // Every connection still reaches the first.
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, &format!("http://{addr}/")).await.text(), "b");
    }
}
