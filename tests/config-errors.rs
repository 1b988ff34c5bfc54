//! Config errors as a user meets them: the same `file:line:col: key: what`
//! text at startup, in `--check`, in the reload log line and on `/status`;
//! environment-override errors naming the variable; `--check`'s warnings and
//! summary; and the README's and the shipped `config.yaml`'s YAML passing
//! the config loader as written.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use lb::config::Config;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// `lb --config PATH --check` with `envs` set: (exit code, stdout, stderr).
fn check(path: &Path, envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .arg("--config")
        .arg(path)
        .arg("--check")
        .env_remove("RUST_LOG")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const ONE_BACKEND: &str = "backends:\n  - address: 127.0.0.1:9001\n";

/// Environment overrides that do not fit, each with the exact error: the
/// variable named as set, the key path, what is wrong and what is expected.
#[test]
fn environment_override_errors_name_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), ONE_BACKEND);
    for (name, value, want) in [
        (
            "LB_TIMEOUTS__CONEKT",
            "2s",
            "environment variable LB_TIMEOUTS__CONEKT: timeouts.conekt: unknown key; expected \
             one of connect, request, client_header, client_body, client_idle, backend_body, \
             client_send, tcp_idle",
        ),
        (
            "LB_RETRY__ATTEMPTS",
            "three",
            "environment variable LB_RETRY__ATTEMPTS: retry.attempts: expected an integer, \
             found \"three\"",
        ),
        (
            "LB_STRATEGY",
            "fastest",
            "environment variable LB_STRATEGY: strategy: \"fastest\" is not a strategy; expected \
             one of round_robin, weighted_round_robin, least_connections, random, \
             power_of_two_choices, consistent_hash, peak_ewma",
        ),
        (
            "LB_TIMEOUTS__CONNECT",
            "5",
            "environment variable LB_TIMEOUTS__CONNECT: timeouts.connect: 5 has no unit; write \
             5s or 5ms",
        ),
        (
            "LB_TIMEOUTS",
            "5s",
            "environment variable LB_TIMEOUTS: timeouts: expected a mapping like {connect: 1s}, \
             found \"5s\"",
        ),
        (
            "LB_RETRY__RETRY_ON",
            "[connect_failure, 404]",
            "environment variable LB_RETRY__RETRY_ON: retry.retry_on[1]: 404 is not a 5xx status \
             code (only server errors are retried)",
        ),
        // Found by validation, after parsing: still the variable, not a line.
        (
            "LB_TIMEOUTS__CONNECT",
            "0s",
            "environment variable LB_TIMEOUTS__CONNECT: timeouts.connect: must be greater than \
             zero",
        ),
        (
            "LB_LISTEN",
            "localhost",
            "environment variable LB_LISTEN: listen: \"localhost\" is not an IP:port address \
             (like 127.0.0.1:8080 or [::]:80)",
        ),
        // A key missing from a mapping the environment set.
        (
            "LB_SESSION_AFFINITY",
            "{ttl=1h}",
            "environment variable LB_SESSION_AFFINITY: session_affinity.cookie: missing: name \
             the cookie lb sets (like lb_backend)",
        ),
        (
            "LB_HASH_KEY",
            "path",
            "environment variable LB_HASH_KEY: hash_key: applies only to strategy \
             consistent_hash (strategy is round_robin)",
        ),
    ] {
        let (code, _, stderr) = check(&path, &[(name, value)]);
        assert_eq!(code, Some(1), "{name}={value}: {stderr}");
        assert_eq!(stderr.trim_end(), want, "{name}={value}");
    }
}

/// The variable is named as it is set: figment matches keys in any case.
#[test]
fn a_lower_case_override_is_named_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), ONE_BACKEND);
    let (code, _, stderr) = check(&path, &[("lb_retry__attempts", "0")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "environment variable lb_retry__attempts: retry.attempts: 0 is out of range (1 to 100)"
    );
}

/// A value from the file keeps its position even when other keys come from
/// the environment.
#[test]
fn a_file_value_keeps_its_position_beside_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "backends:\n  - address: 127.0.0.1:9001\ntimeouts:\n  connect: 0s\n",
    );
    let (code, _, stderr) = check(&path, &[("LB_TIMEOUTS__REQUEST", "5s")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "{}:4:12: timeouts.connect: must be greater than zero",
            path.display()
        )
    );
}

#[test]
fn check_warns_about_a_per_try_timeout_the_request_timeout_cuts() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("{ONE_BACKEND}timeouts:\n  request: 5s\nretry:\n  per_try_timeout: 10s\n"),
    );
    let (code, _, stderr) = check(&path, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "warning: {}:6:20: retry.per_try_timeout: 10s is longer than timeouts.request (5s), \
             which bounds all tries together: a try is cut at 5s anyway",
            path.display()
        )
    );
}

/// As `nginx -t` does, `--check` looks backend names up; unlike nginx it
/// warns instead of failing (lb resolves on every connect, so a name that
/// appears later starts working). `.invalid` never resolves (RFC 6761).
#[test]
fn check_warns_about_a_backend_name_that_does_not_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "backends:\n  - address: 127.0.0.1:9001\n  - address: no-such-host.invalid:80\n",
    );
    let (code, stdout, stderr) = check(&path, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(": ok "), "{stdout}");
    let prefix = format!(
        "warning: {}:3:14: backends[1].address: host name \"no-such-host.invalid\" does not \
         resolve (",
        path.display()
    );
    assert!(stderr.starts_with(&prefix), "{stderr}");
    assert!(
        stderr
            .trim_end()
            .ends_with("); every connection to it fails until it does"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// The warning `--check` prints is logged at startup too.
#[tokio::test]
async fn startup_logs_the_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("listen: 127.0.0.1:0\n{ONE_BACKEND}retry:\n  per_try_timeout: 31s\n"),
    );
    let p = LbProcess::spawn(&["--config", path.to_str().unwrap()], &[]);
    let want = format!(
        "{}:5:20: retry.per_try_timeout: 31s is longer than timeouts.request (30s)",
        path.display()
    );
    eventually!(
        WAIT,
        p.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("WARN") && l.contains(&want)),
        "{}",
        p.log_text()
    );
}

#[test]
fn check_summary_names_admin_and_access_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("{ONE_BACKEND}admin: 127.0.0.1:9901\naccess_log: true\n"),
    );
    let (code, stdout, stderr) = check(&path, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(
            "1 backend (total weight 1), health checks off, retry 3 attempts, admin \
             127.0.0.1:9901, access log on"
        ),
        "{stdout}"
    );
}

#[test]
fn zero_workers_is_refused_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), ONE_BACKEND);
    for (value, want) in [
        ("0", "must be at least 1 (leave it out for one per core)"),
        ("many", "`many` is not a number of threads"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_lb"))
            .arg("--config")
            .arg(&path)
            .args(["--check", "--workers", value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "invalid value '{value}' for '--workers <WORKERS>': {want}"
            )),
            "{stderr}"
        );
    }
}

/// The bad config of the issue, line 4: a backend written as a bare string.
const BAD: &str =
    "admin: 127.0.0.1:0\nbackends:\n  - address: 127.0.0.1:9001\n  - 127.0.0.1:9002\n";

/// One error, the same text everywhere a user can meet it.
#[tokio::test]
async fn the_same_message_at_startup_in_check_on_reload_and_on_status() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &format!("listen: 127.0.0.1:0\n{BAD}"));
    let want = format!(
        "{}:5:5: backends[1]: expected a mapping like {{address: host:port, weight: 1}}, found \
         \"127.0.0.1:9002\"",
        path.display()
    );
    assert_eq!(Config::load(&path).unwrap_err().to_string(), want);

    let (code, _, stderr) = check(&path, &[]);
    assert_eq!((code, stderr.trim_end()), (Some(1), want.as_str()));

    // Startup: the error line, and exit 1.
    let mut p = LbProcess::spawn(&["--config", path.to_str().unwrap()], &[]);
    let status = p.child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{}", p.log_text());
    eventually!(
        WAIT,
        p.log_text().contains(&want),
        "startup: {}",
        p.log_text()
    );

    // Reload: the log line of the real binary.
    let good = format!("listen: 127.0.0.1:0\n{ONE_BACKEND}");
    std::fs::write(&path, &good).unwrap();
    let p = LbProcess::spawn(&["--config", path.to_str().unwrap()], &[]);
    p.wait_listening().await;
    std::fs::write(&path, format!("listen: 127.0.0.1:0\n{BAD}")).unwrap();
    p.signal("HUP");
    eventually!(
        WAIT,
        p.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("ERROR") && l.contains(&want)),
        "reload: {}",
        p.log_text()
    );

    // /status and POST /reload, on an in-process lb.
    let t = TestLb::start("admin: 127.0.0.1:0\nbackends:\n  - address: 127.0.0.1:9001\n").await;
    let admin = t.lb.admin_addr().expect("admin bound");
    t.rewrite(BAD);
    let want = want.replace(&path.display().to_string(), &t.path.display().to_string());
    let c = client();
    eventually!(WAIT, t.rejected() > 0);
    let status: serde_json::Value =
        serde_json::from_slice(&get(&c, &format!("http://{admin}/status")).await.body).unwrap();
    let last = &status["last_reload"];
    assert_eq!(last["error"], want.as_str(), "{status}");
    assert_eq!(
        (&last["line"], &last["column"]),
        (&5.into(), &5.into()),
        "{status}"
    );
}

/// The ```yaml blocks of a Markdown text, each with the line its fence is on.
fn yaml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match &mut open {
            None if matches!(line.trim(), "```yaml" | "```yml") => {
                open = Some((i + 1, String::new()));
            }
            Some(_) if line.trim() == "```" => blocks.extend(open.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    assert!(open.is_none(), "unclosed ```yaml block");
    blocks
}

/// A block that is part of a config, not a whole one, says so on its first
/// line; every other block must be a config lb accepts as written.
const FRAGMENT_MARK: &str = "# fragment";

#[test]
fn every_readme_yaml_block_is_a_valid_config_or_marked_a_fragment() {
    let readme = std::fs::read_to_string(Path::new(MANIFEST_DIR).join("README.md")).unwrap();
    let blocks = yaml_blocks(&readme);
    assert!(blocks.len() >= 2, "the README's YAML blocks were not found");
    let mut checked = 0;
    for (line, text) in &blocks {
        if text.trim_start().starts_with(FRAGMENT_MARK) {
            continue;
        }
        // Blank lines in front so positions in errors are README.md's own.
        let padded = format!("{}{text}", "\n".repeat(*line));
        if let Err(e) = Config::parse(padded.as_bytes(), Path::new("README.md")) {
            panic!("{e}\n(mark the block `{FRAGMENT_MARK}: …` if it is not a whole config)");
        }
        checked += 1;
    }
    assert!(checked >= 1, "every block is a fragment?");
}

#[test]
fn yaml_blocks_are_found_with_their_lines() {
    let md = "text\n```yaml\na: 1\n```\n```sh\nls\n```\n```yaml\n# fragment: x\nb: 2\n```\n";
    assert_eq!(
        yaml_blocks(md),
        [
            (2, "a: 1\n".to_owned()),
            (8, "# fragment: x\nb: 2\n".to_owned())
        ]
    );
}

#[test]
fn shipped_config_loads_and_its_comment_lists_every_strategy() {
    let path = Path::new(MANIFEST_DIR).join("config.yaml");
    let (config, _) = Config::load(&path).unwrap();
    assert!(!config.first_pool().backends.is_empty());
    let text = std::fs::read_to_string(&path).unwrap();
    // The strategy line's comment and its continuation lines.
    let comment: String = text
        .lines()
        .skip_while(|l| !l.starts_with("strategy:"))
        .take_while(|l| l.starts_with("strategy:") || l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('#').map(|(_, c)| c))
        .collect::<Vec<_>>()
        .join(" ");
    let listed: Vec<&str> = comment
        .split(|c: char| c == '|' || c.is_whitespace())
        .collect();
    for name in lb::config::strategy_names() {
        assert!(listed.contains(&name), "{name} missing from: {comment}");
    }
}
