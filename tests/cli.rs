//! The `lb` binary: `--check`, environment overrides, startup errors.

mod common;

use std::process::Command;

use common::*;

fn lb() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lb"));
    c.env_remove("RUST_LOG");
    c
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
    let out = lb()
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        path,
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
        c.stdout.contains("ok") && c.stdout.contains("1 backends (total weight 2)"),
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
        c.stderr.contains("unknown field `stratgy`") && c.stderr.contains("line 2"),
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
    let c = check(ONE_BACKEND, &[("LB_STRATGY", "random")]);
    assert_eq!(c.code, Some(1), "{}", c.stderr);
    assert!(c.stderr.contains("stratgy"), "{}", c.stderr);
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
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || p.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Idle connections close at once: exit does not wait out the grace period.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn startup_with_a_bad_config_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "backends: []\n");
    let mut p = LbProcess::spawn(&["--config", path.to_str().unwrap()], &[]);
    let status = tokio::task::spawn_blocking(move || {
        let s = p.child.wait().unwrap();
        (s, p.log_text())
    })
    .await
    .unwrap();
    assert_eq!(status.0.code(), Some(1));
    assert!(status.1.contains("backends: is empty"), "{}", status.1);
}
