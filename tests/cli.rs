//! The `lb` binary: `--check`, environment overrides, startup errors.

mod common;

use std::process::Command;

use common::*;

fn lb() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lb"));
    c.env_remove("RUST_LOG");
    c
}

#[test]
fn check_accepts_a_good_file_and_summarises_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "backends:\n  - address: 127.0.0.1:9001\n    weight: 2\n",
    );
    let out = lb()
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("ok") && stdout.contains("1 backends (total weight 2)"),
        "{stdout}"
    );
}

#[test]
fn check_rejects_a_bad_file_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "listen: 127.0.0.1:8080\nstratgy: random\nbackends: []\n",
    );
    let out = lb()
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(
        stderr.contains("unknown field `stratgy`") && stderr.contains("line 2"),
        "{stderr}"
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
    let path = write_config(dir.path(), "backends:\n  - address: 127.0.0.1:9001\n");
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
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "backends:\n  - address: 127.0.0.1:9001\n");
    let out = lb()
        .arg("--check")
        .env("LB_CONFIG", &path)
        .env("LB_LISTEN", "127.0.0.1:18999")
        .env("LB_STRATEGY", "random")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("listen 127.0.0.1:18999") && stdout.contains("strategy random"),
        "{stdout}"
    );
    let out = lb()
        .arg("--check")
        .env("LB_CONFIG", &path)
        .env("LB_TIMEOUTS__CONNECT", "0s")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("timeouts.connect: must be greater than zero"));
    let out = lb()
        .arg("--check")
        .env("LB_CONFIG", &path)
        .env("LB_STRATGY", "random")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stratgy"), "{stderr}");
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
